//! Connecting to marsd's control socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use super::pb::marsd_client::MarsdClient;

/// A client of the marsd at `socket`. Uses nothing but the socket path, so it
/// works from another network namespace.
pub async fn connect(socket: &Path) -> Result<MarsdClient<Channel>, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://marsd.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(MarsdClient::new(channel))
}
