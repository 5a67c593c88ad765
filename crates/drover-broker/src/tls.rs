//! TLS settings of an `amqps://` URL: the CA and the client certificate, named the way
//! RabbitMQ's own URI query parameters name them.
//!
//! `amqps://user:pass@host:5671/vhost?cacertfile=/etc/drover/ca.pem` trusts that CA's
//! certificates in addition to the system's roots; `&certfile=…&keyfile=…` (PEM, the key in
//! PKCS#8, PKCS#1 or SEC1) presents a client certificate, for brokers that require one
//! (`ssl_options.fail_if_no_peer_cert`). The server's name is always checked against its
//! certificate (rustls has no switch to turn that off). Keeping the settings in the URL
//! means every part that connects (worker, producers, dashboard, doctor) gets them from the
//! one setting, `DROVER_AMQP_URL` or `DROVER_AMQP_URL_FILE`.

use crate::BrokerError;
use crate::endpoint::percent_decode;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;

/// The TLS query parameters this crate reads.
pub const TLS_PARAMS: [&str; 3] = ["cacertfile", "certfile", "keyfile"];

/// Reads the TLS files a URL names (none: lapin's defaults, the system's roots). `tls` is
/// whether the scheme is `amqps`: the parameters on a plain `amqp://` URL are an error, not
/// silently ignored, since the operator asked for TLS.
pub(crate) fn tls_config(url: &str, tls: bool) -> Result<OwnedTLSConfig, BrokerError> {
    let mut ca = None;
    let mut cert = None;
    let mut key = None;
    let query = url
        .split_once('?')
        .map_or("", |(_, q)| q.split('#').next().unwrap_or(""));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "cacertfile" => &mut ca,
            "certfile" => &mut cert,
            "keyfile" => &mut key,
            _ => continue,
        };
        let path = percent_decode(value)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                invalid(
                    name,
                    "expects a file path (percent-encoded when it has to be)",
                )
            })?;
        *slot = Some(PathBuf::from(path));
    }
    if (ca.is_some() || cert.is_some() || key.is_some()) && !tls {
        return Err(invalid(
            "cacertfile/certfile/keyfile",
            "need an amqps:// URL (TLS); this one is amqp://",
        ));
    }
    let mut config = OwnedTLSConfig::default();
    if let Some(path) = ca {
        let pem = read("cacertfile", &path)?;
        let n = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid_file("cacertfile", &path, &format!("not PEM certificates: {e}")))?
            .len();
        if n == 0 {
            return Err(invalid_file(
                "cacertfile",
                &path,
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
        let text = String::from_utf8(pem)
            .map_err(|_| invalid_file("cacertfile", &path, "is not text (PEM expected)"))?;
        config.cert_chain = Some(text);
    }
    match (cert, key) {
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            return Err(invalid(
                "certfile/keyfile",
                "a client certificate needs both certfile and keyfile",
            ));
        }
        (Some(cert_path), Some(key_path)) => {
            let pem = read("certfile", &cert_path)?;
            let n = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    invalid_file(
                        "certfile",
                        &cert_path,
                        &format!("not PEM certificates: {e}"),
                    )
                })?
                .len();
            if n == 0 {
                return Err(invalid_file(
                    "certfile",
                    &cert_path,
                    "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                ));
            }
            let key = read("keyfile", &key_path)?;
            // Never quote the key's content: only whether it parses.
            PrivateKeyDer::from_pem_slice(&key).map_err(|_| {
                invalid_file(
                    "keyfile",
                    &key_path,
                    "holds no PEM private key (PKCS#8, PKCS#1 or SEC1, unencrypted)",
                )
            })?;
            config.identity = Some(OwnedIdentity::PKCS8 { pem, key });
        }
    }
    Ok(config)
}

fn read(param: &str, path: &PathBuf) -> Result<Vec<u8>, BrokerError> {
    std::fs::read(path).map_err(|e| invalid_file(param, path, &e.to_string()))
}

fn invalid(param: &str, reason: &str) -> BrokerError {
    BrokerError::Invalid {
        what: format!("AMQP URL parameter {param}"),
        reason: reason.to_string(),
    }
}

fn invalid_file(param: &str, path: &std::path::Path, reason: &str) -> BrokerError {
    BrokerError::Invalid {
        what: format!("AMQP URL parameter {param}"),
        reason: format!("{}: {reason}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_parameters_no_files() {
        let c = tls_config("amqps://u:p@h/v?heartbeat=5", true).unwrap();
        assert!(c.cert_chain.is_none() && c.identity.is_none());
    }

    #[test]
    fn tls_parameters_need_amqps() {
        let e = tls_config("amqp://h/v?cacertfile=/x.pem", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqps://"), "{e}");
    }

    #[test]
    fn files_are_named_in_errors() {
        let e = tls_config("amqps://h/v?cacertfile=/nonexistent/ca.pem", true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cacertfile") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("drover-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let url = format!("amqps://h/v?cacertfile={}", not_pem.display());
        let e = tls_config(&url, true).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = tls_config("amqps://h/v?certfile=/c.pem", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("both certfile and keyfile"), "{e}");
    }
}
