//! The connection to the Kubernetes API server, found the standard way: the in-cluster
//! service account, else `KUBECONFIG` or `~/.kube/config`. Shared by leader election and
//! the ConfigMap state backend.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no Kubernetes configuration: not in a pod, and no usable KUBECONFIG or ~/.kube/config ({0})"
    )]
    Config(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
}

/// A client, and the namespace to use: `namespace` if given, else the pod's (or the
/// kubeconfig context's).
pub async fn connect(namespace: Option<&str>) -> Result<(kube::Client, String), ClusterError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| ClusterError::Config(e.to_string()))?;
    // A request that hangs must not hang the election: its callers bound every call, and
    // these bound the sockets underneath.
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(15));
    let namespace = namespace.map_or_else(|| config.default_namespace.clone(), str::to_owned);
    let client = kube::Client::try_from(config).map_err(|e| ClusterError::Client(e.to_string()))?;
    Ok((client, namespace))
}

/// A `409 Conflict`: the object changed since the `resourceVersion` the write carried.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}
