//! The gRPC service: each call returns once its effect is complete.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::{self, marsd_server::Marsd};
use crate::node::Node;
use crate::resource;
use crate::size::format_size;

pub struct Service {
    node: Arc<Node>,
}

impl Service {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Runs blocking node work (role changes write back, deletes touch disks)
    /// off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Node) -> resource::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let node = Arc::clone(&self.node);
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| Status::internal(format!("marsd task failed: {e}")))?
            .map_err(Status::from)
    }
}

fn reply(message: String) -> Result<Response<pb::Reply>, Status> {
    Ok(Response::new(pb::Reply { message }))
}

#[tonic::async_trait]
impl Marsd for Service {
    async fn create_resource(
        &self,
        req: Request<pb::CreateResourceRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let r = req.into_inner();
        let (name, size) = (r.name.clone(), r.size);
        self.blocking(move |n| n.create_resource(&r.name, &PathBuf::from(&r.path), r.size))
            .await?;
        self.node.announce_created(&name, size).await;
        let n2 = name.clone();
        let note = self.blocking(move |n| Ok(n.auto_device(&n2))).await?;
        reply(format!(
            "created resource {name} ({}) with this node as primary{note}",
            format_size(size)
        ))
    }

    async fn delete_resource(
        &self,
        req: Request<pb::ResourceRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let name = req.into_inner().name;
        let n2 = name.clone();
        self.blocking(move |n| n.delete_resource(&n2)).await?;
        reply(format!(
            "deleted resource {name}; its backing device is kept"
        ))
    }

    async fn primary(
        &self,
        req: Request<pb::ResourceRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let r = req.into_inner();
        if r.force {
            reply(self.node.force_primary(&r.name).await?)
        } else {
            reply(self.node.make_primary(&r.name).await?)
        }
    }

    async fn secondary(
        &self,
        req: Request<pb::ResourceRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let name = req.into_inner().name;
        reply(self.node.make_secondary(&name).await?)
    }

    async fn resize(&self, req: Request<pb::ResizeRequest>) -> Result<Response<pb::Reply>, Status> {
        let r = req.into_inner();
        self.node.resource(&r.name)?.resize(r.size).await?;
        let (n2, size) = (r.name.clone(), r.size);
        let note = self
            .blocking(move |n| Ok(n.resize_device(&n2, size)))
            .await?;
        // Secondaries grow their backing file when they apply the resize
        // record; the new size in the cluster state is what `view` shows.
        let (name, size) = (r.name.clone(), r.size);
        self.node
            .announce(|m| m.set_config(&name, Some(crate::membership::ResourceConfig { size })))
            .await;
        reply(format!("{} is now {}{note}", r.name, format_size(r.size)))
    }

    async fn log_rotate(
        &self,
        req: Request<pb::ResourceRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let name = req.into_inner().name;
        if self.node.resource(&name)?.log_rotate().await? {
            reply(format!("{name}: started a new logfile"))
        } else {
            reply(format!(
                "{name}: the current logfile holds no record yet; no new logfile"
            ))
        }
    }

    async fn log_delete(
        &self,
        req: Request<pb::ResourceRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let name = req.into_inner().name;
        let n2 = name.clone();
        let freed = self
            .blocking(move |n| n.resource(&n2)?.log_delete())
            .await?;
        reply(format!(
            "{name}: deleted {} of written-back logfiles",
            format_size(freed)
        ))
    }

    async fn join_cluster(
        &self,
        req: Request<pb::JoinClusterRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let addr = req.into_inner().addr;
        reply(self.node.join_cluster(&addr).await?)
    }

    async fn join_resource(
        &self,
        req: Request<pb::JoinResourceRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let r = req.into_inner();
        reply(
            self.node
                .join_resource(&r.name, &PathBuf::from(&r.path))
                .await?,
        )
    }

    async fn leave_resource(
        &self,
        req: Request<pb::ResourceRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let name = req.into_inner().name;
        let msg = self.blocking(move |n| n.leave_resource(&name)).await?;
        crate::replication::links::push_to_all(self.node.cluster()).await;
        reply(msg)
    }

    async fn invalidate(
        &self,
        req: Request<pb::ResourceRequest>,
    ) -> Result<Response<pb::Reply>, Status> {
        let name = req.into_inner().name;
        reply(self.node.invalidate(&name).await?)
    }

    async fn steer(&self, req: Request<pb::SteerRequest>) -> Result<Response<pb::Reply>, Status> {
        use crate::cluster_ops::Steer;
        let r = req.into_inner();
        let what = match r.action.as_str() {
            "pause-fetch" => Steer::PauseFetch,
            "resume-fetch" => Steer::ResumeFetch,
            "pause-replay" => Steer::PauseReplay,
            "resume-replay" => Steer::ResumeReplay,
            "disconnect" => Steer::Disconnect,
            "connect" => Steer::Connect,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown steering action {other}"
                )));
            }
        };
        reply(self.node.steer(&r.name, what).await?)
    }

    async fn view(&self, req: Request<pb::ViewRequest>) -> Result<Response<pb::ViewReply>, Status> {
        Ok(Response::new(self.node.view(&req.into_inner().name)?))
    }

    async fn up(
        &self,
        req: Request<pb::ResourceRequest>,
    ) -> Result<Response<pb::DeviceReply>, Status> {
        let name = req.into_inner().name;
        let n2 = name.clone();
        let device = self.blocking(move |n| n.device_up(&n2)).await?;
        Ok(Response::new(pb::DeviceReply {
            message: format!("{name} is up as {device}"),
            device,
        }))
    }

    async fn attach(
        &self,
        req: Request<pb::ResourceRequest>,
    ) -> Result<Response<pb::DeviceReply>, Status> {
        let name = req.into_inner().name;
        let n2 = name.clone();
        let device = self.blocking(move |n| n.attach_remote(&n2)).await?;
        Ok(Response::new(pb::DeviceReply {
            message: format!("{name} is attached as {device}"),
            device,
        }))
    }

    async fn down(&self, req: Request<pb::ResourceRequest>) -> Result<Response<pb::Reply>, Status> {
        let name = req.into_inner().name;
        let n2 = name.clone();
        match self.blocking(move |n| n.device_down(&n2)).await? {
            Some(path) => reply(format!("{name}: removed {path}")),
            None => reply(format!("{name} has no ublk device on this node")),
        }
    }
}
