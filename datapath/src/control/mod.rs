//! The marsd control API: gRPC (tonic) over the unix socket `ROOT/marsd.sock`.
//! Errors of the layers below are converted to a `Status` here, once.

pub mod client;
pub mod service;

/// Generated messages and service of `proto/marsd.proto`.
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("mars.v1");
}

use tonic::{Code, Status};

use crate::frontend::{IoError, ublk};
use crate::resource::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotPrimary { .. } | Error::InUse { .. } => Code::FailedPrecondition,
            // The backing path is the user's input: a bad one is refused, not "internal".
            Error::Backing { .. } => Code::FailedPrecondition,
            Error::Io { .. } => Code::Internal,
            Error::Log {
                source: crate::log::Error::Corruption { .. },
                ..
            } => Code::DataLoss,
            Error::Log { .. } | Error::Apply { .. } => Code::Internal,
            Error::Volume(IoError::NoSpace { .. }) => Code::ResourceExhausted,
            Error::Volume(IoError::NotPrimary(_)) => Code::FailedPrecondition,
            Error::Volume(IoError::ShuttingDown(_)) => Code::Unavailable,
            Error::Volume(_) => Code::Internal,
            Error::Cluster(_) => Code::FailedPrecondition,
            Error::Device(d) => match d {
                ublk::Error::InUse { .. } | ublk::Error::Unavailable(_) => Code::FailedPrecondition,
                ublk::Error::BlockSize { .. } => Code::InvalidArgument,
                ublk::Error::Ublk { .. } | ublk::Error::Timeout { .. } => Code::Internal,
            },
        };
        Status::new(code, e.to_string())
    }
}
