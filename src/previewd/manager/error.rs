//! The manager's one error type. `api` turns it into a `tonic::Status`, in
//! one place; here each error only says what happened and to which field.

use crate::model::FieldError;
use crate::previewd::auth::AuthError;
use crate::previewd::cluster::KubeError;
use crate::previewd::dbs::DbError;
use crate::previewd::queues::QueueError;
use crate::previewd::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(#[from] FieldError),
    #[error("{field}: {message}")]
    NotFound { field: String, message: String },
    #[error("{field}: {message}")]
    AlreadyExists { field: String, message: String },
    #[error("{field}: {message}")]
    FailedPrecondition { field: String, message: String },
    #[error("{field}: {message}")]
    PermissionDenied { field: String, message: String },
    /// Over a server limit (the message names the flag).
    #[error("{field}: {message}")]
    ResourceExhausted { field: String, message: String },
    /// A cluster call failed, or the cluster lacks what the request names
    /// (`field`, when one is to blame).
    #[error("{}{source}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Cluster { field: Option<String>, source: KubeError },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The API server could not be asked who the caller is or what they may do.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A broker call failed (`field`: the split queue it is about).
    #[error("{}{source}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Queue { field: Option<String>, source: Box<QueueError> },
    /// A source database or a branch server (`field`: the branch it is about).
    #[error("{}{source}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Db { field: Option<String>, source: DbError },
}

impl From<DbError> for Error {
    fn from(source: DbError) -> Self {
        Error::Db { field: None, source }
    }
}

impl From<QueueError> for Error {
    fn from(source: QueueError) -> Self {
        Error::Queue { field: None, source: Box::new(source) }
    }
}

impl From<KubeError> for Error {
    fn from(source: KubeError) -> Self {
        Error::Cluster { field: None, source }
    }
}

impl Error {
    /// A cluster error about the request's `field`.
    pub fn cluster(field: impl Into<String>, source: KubeError) -> Self {
        Error::Cluster { field: Some(field.into()), source }
    }
}

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::InvalidArgument(FieldError::new(field, message))
}
