//! This module owns the TLS side of the fake API server: a fresh CA and a `localhost`
//! certificate per listener (rcgen), served with rustls on the aws-lc provider — the one
//! Sentry uses — so that a test proves Sentry's client completes a handshake with exactly
//! one crypto provider in the process.

use base64::Engine as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types::PrivateKeyDer};

/// Serves `app` over TLS on `listener`; returns the CA certificate as kubeconfig
/// `certificate-authority-data` (base64 of the PEM).
pub fn serve(listener: tokio::net::TcpListener, app: axum::Router) -> String {
    base64::engine::general_purpose::STANDARD.encode(serve_pem(listener, app))
}

/// Serves `app` over TLS on `listener` with a `localhost`/`127.0.0.1` certificate from a
/// fresh CA; returns that CA's certificate as PEM.
pub fn serve_pem(listener: tokio::net::TcpListener, app: axum::Router) -> String {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL (libgit2) takes a leaf whose issuer equals its own subject
    // (rcgen's default name for both) for a self-signed certificate.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Sentry test CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("leaf params");
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("leaf");
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let config = rustls::ServerConfig::builder_with_provider(provider.into())
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = TlsAcceptor::from(std::sync::Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = TowerToHyperService::new(app);
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    ca.pem()
}
