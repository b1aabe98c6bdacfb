//! Host-side PKI for the gateway control plane. This crate owns the mutual-TLS
//! material: a per-install CA, the server certificate the gateway presents
//! inside the microVM, and the client certificate the host uses to call it.
//! It also owns how that material lands on disk (private directories, keys
//! readable only by the owner, atomic replacement) and how it is read back.
//! It deliberately knows nothing about gRPC; callers convert [`ClientBundle`]
//! and [`ServerMaterial`] into whatever their transport wants.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// File names inside a client bundle directory.
pub const CLIENT_CA_FILE: &str = "ca.crt";
pub const CLIENT_CERT_FILE: &str = "tls.crt";
pub const CLIENT_KEY_FILE: &str = "tls.key";
/// File names inside a server material directory (what the gateway's `--tls-dir` reads).
pub const SERVER_CA_FILE: &str = "ca.crt";
pub const SERVER_CERT_FILE: &str = "server.crt";
pub const SERVER_KEY_FILE: &str = "server.key";

/// Names the server certificate is valid for: loopback for port-forwarded
/// access from the host, `gateway` as the stable in-VM service name.
pub const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "gateway"];

const DIR_MODE: u32 = 0o700;
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "generating the {what}: {source}; this points at a broken RNG or a bug, retry and report it if it persists"
    )]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("creating directory {path}: {source}; check that its parent exists and is writable by this user")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}: {source}; check free space and permissions of the directory, then generate again")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}: {source}; generate the material first (Pki::generate then write it) or fix the file's permissions")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} does not hold a PEM {expected} ({detail}); delete the directory and generate the material again")]
    Malformed { path: PathBuf, expected: &'static str, detail: String },
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;

/// What the host needs to call the gateway: the CA that signed the server
/// certificate, and the host's own certificate and key. All PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientBundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// What the gateway needs to serve: the CA that client certificates must
/// chain to, and the server's own certificate and key. All PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerMaterial {
    pub client_ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A freshly generated CA with one server and one client certificate.
///
/// The CA key is kept only in memory and dropped with this value: rotating
/// means generating a new `Pki`, so nothing long-lived can mint certificates.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca_cert_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

fn leaf_params(
    cn: String,
    sans: Vec<String>,
    eku: ExtendedKeyUsagePurpose,
    what: &'static str,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(sans).map_err(gen_err(what))?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl Pki {
    /// Generates a new CA (ECDSA P-256) and signs a server certificate for
    /// [`SERVER_NAMES`] (serverAuth) and a client certificate (clientAuth).
    /// `common_name_prefix` only makes the certificates recognisable.
    pub fn generate(common_name_prefix: &str) -> Result<Pki> {
        let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA"))?;
        ca_params.distinguished_name = DistinguishedName::new();
        ca_params.distinguished_name.push(DnType::CommonName, format!("{common_name_prefix} CA"));
        // Path length 0: this CA signs leaves only, never another CA.
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err("CA"))?;

        let server_key = KeyPair::generate().map_err(gen_err("server key"))?;
        let server_cert = leaf_params(
            format!("{common_name_prefix} gateway"),
            SERVER_NAMES.iter().map(|s| s.to_string()).collect(),
            ExtendedKeyUsagePurpose::ServerAuth,
            "server certificate",
        )?
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(gen_err("server certificate"))?;

        let client_key = KeyPair::generate().map_err(gen_err("client key"))?;
        let client_cert = leaf_params(
            format!("{common_name_prefix} host client"),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            "client certificate",
        )?
        .signed_by(&client_key, &ca_cert, &ca_key)
        .map_err(gen_err("client certificate"))?;

        Ok(Pki {
            ca_cert_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        })
    }

    pub fn client_bundle(&self) -> ClientBundle {
        ClientBundle {
            ca_pem: self.ca_cert_pem.clone(),
            cert_pem: self.client_cert_pem.clone(),
            key_pem: self.client_key_pem.clone(),
        }
    }

    pub fn server_material(&self) -> ServerMaterial {
        ServerMaterial {
            // One CA signs both sides, so it is also the client CA.
            client_ca_pem: self.ca_cert_pem.clone(),
            cert_pem: self.server_cert_pem.clone(),
            key_pem: self.server_key_pem.clone(),
        }
    }

    /// Writes `ca.crt`, `tls.crt` and `tls.key` into `dir` (see [`ClientBundle::write`]).
    pub fn write_client_bundle(&self, dir: &Path) -> Result<()> {
        self.client_bundle().write(dir)
    }

    /// Writes `ca.crt`, `server.crt` and `server.key` into `dir` (see [`ServerMaterial::write`]).
    pub fn write_server_material(&self, dir: &Path) -> Result<()> {
        self.server_material().write(dir)
    }
}

impl ClientBundle {
    /// Creates `dir` with mode 0700 if needed and writes the bundle; the key
    /// gets mode 0600. Each file is replaced atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        create_private_dir(dir)?;
        write_atomic(&dir.join(CLIENT_CA_FILE), &self.ca_pem, CERT_MODE)?;
        write_atomic(&dir.join(CLIENT_CERT_FILE), &self.cert_pem, CERT_MODE)?;
        write_atomic(&dir.join(CLIENT_KEY_FILE), &self.key_pem, KEY_MODE)
    }
}

impl ServerMaterial {
    /// Creates `dir` with mode 0700 if needed and writes the material; the
    /// key gets mode 0600. Each file is replaced atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        create_private_dir(dir)?;
        write_atomic(&dir.join(SERVER_CA_FILE), &self.client_ca_pem, CERT_MODE)?;
        write_atomic(&dir.join(SERVER_CERT_FILE), &self.cert_pem, CERT_MODE)?;
        write_atomic(&dir.join(SERVER_KEY_FILE), &self.key_pem, KEY_MODE)
    }
}

/// Reads a bundle written by [`Pki::write_client_bundle`], checking that each
/// file holds PEM of the expected kind so a mix-up fails here, not in a TLS
/// handshake.
pub fn load_client_bundle(dir: &Path) -> Result<ClientBundle> {
    Ok(ClientBundle {
        ca_pem: read_pem(&dir.join(CLIENT_CA_FILE), PemKind::Certificate)?,
        cert_pem: read_pem(&dir.join(CLIENT_CERT_FILE), PemKind::Certificate)?,
        key_pem: read_pem(&dir.join(CLIENT_KEY_FILE), PemKind::PrivateKey)?,
    })
}

/// Reads material written by [`Pki::write_server_material`], with the same
/// checks as [`load_client_bundle`].
pub fn load_server_material(dir: &Path) -> Result<ServerMaterial> {
    Ok(ServerMaterial {
        client_ca_pem: read_pem(&dir.join(SERVER_CA_FILE), PemKind::Certificate)?,
        cert_pem: read_pem(&dir.join(SERVER_CERT_FILE), PemKind::Certificate)?,
        key_pem: read_pem(&dir.join(SERVER_KEY_FILE), PemKind::PrivateKey)?,
    })
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let err = |source| PkiError::CreateDir { path: dir.to_path_buf(), source };
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(err)?;
    // An already existing directory keeps its old mode otherwise, and it is
    // about to hold a private key.
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)).map_err(err)
}

/// Writes via a sibling temp file created with its final mode, so the key is
/// never readable by others even for a moment, and readers never see a
/// half-written file.
fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let err = |source| PkiError::Write { path: path.to_path_buf(), source };
    let name = path.file_name().expect("callers pass dir.join(constant)").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[derive(Clone, Copy)]
enum PemKind {
    Certificate,
    PrivateKey,
}

impl PemKind {
    fn describe(self) -> &'static str {
        match self {
            PemKind::Certificate => "certificate",
            PemKind::PrivateKey => "private key",
        }
    }

    fn accepts(self, tag: &str) -> bool {
        match self {
            PemKind::Certificate => tag == "CERTIFICATE",
            PemKind::PrivateKey => {
                matches!(tag, "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY")
            }
        }
    }
}

fn read_pem(path: &Path, kind: PemKind) -> Result<String> {
    let text = fs::read_to_string(path).map_err(|source| PkiError::Read { path: path.to_path_buf(), source })?;
    let malformed =
        |detail: String| PkiError::Malformed { path: path.to_path_buf(), expected: kind.describe(), detail };
    let blocks = pem::parse_many(&text).map_err(|e| malformed(e.to_string()))?;
    match blocks.first() {
        None => Err(malformed("no PEM block found".into())),
        Some(b) if !kind.accepts(b.tag()) => Err(malformed(format!("found {}", b.tag()))),
        Some(_) => Ok(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use std::sync::Arc;

    fn der(pem_text: &str) -> CertificateDer<'static> {
        CertificateDer::from(pem::parse(pem_text).unwrap().into_contents())
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(ca_pem: &str) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(der(ca_pem)).unwrap();
        Arc::new(roots)
    }

    use rustls::CertificateError::{
        InvalidPurpose, InvalidPurposeContext, NotValidForName, NotValidForNameContext, UnknownIssuer,
    };
    use rustls::Error::InvalidCertificate as Invalid;

    fn verify_server(ca_pem: &str, cert_pem: &str, name: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca_pem), provider()).build().unwrap();
        verifier
            .verify_server_cert(
                &der(cert_pem),
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    fn verify_client(ca_pem: &str, cert_pem: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem), provider()).build().unwrap();
        verifier.verify_client_cert(&der(cert_pem), &[], UnixTime::now()).map(|_| ())
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn server_cert_verifies_for_every_san() {
        let pki = Pki::generate("test").unwrap();
        for name in SERVER_NAMES {
            verify_server(&pki.ca_cert_pem, &pki.server_cert_pem, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let err = verify_server(&pki.ca_cert_pem, &pki.server_cert_pem, "example.com").unwrap_err();
        assert!(
            matches!(err, Invalid(NotValidForName | NotValidForNameContext { .. })),
            "a name outside the SANs must fail as such, not {err:?}"
        );
    }

    #[test]
    fn client_cert_verifies_and_ekus_are_not_interchangeable() {
        let pki = Pki::generate("test").unwrap();
        verify_client(&pki.ca_cert_pem, &pki.client_cert_pem).unwrap();
        // The EKUs keep a leaked client cert from impersonating the gateway and vice versa.
        for err in [
            verify_client(&pki.ca_cert_pem, &pki.server_cert_pem).unwrap_err(),
            verify_server(&pki.ca_cert_pem, &pki.client_cert_pem, "localhost").unwrap_err(),
        ] {
            assert!(
                matches!(err, Invalid(InvalidPurpose | InvalidPurposeContext { .. })),
                "a certificate of the other purpose must fail on its EKU, not {err:?}"
            );
        }
    }

    #[test]
    fn two_generates_give_unrelated_cas() {
        let a = Pki::generate("a").unwrap();
        let b = Pki::generate("b").unwrap();
        assert_ne!(a.ca_cert_pem, b.ca_cert_pem);
        for err in [
            verify_server(&b.ca_cert_pem, &a.server_cert_pem, "localhost").unwrap_err(),
            verify_client(&b.ca_cert_pem, &a.client_cert_pem).unwrap_err(),
        ] {
            assert!(
                matches!(err, Invalid(UnknownIssuer)),
                "another CA's certificate must be of an unknown issuer, not {err:?}"
            );
        }
    }

    #[test]
    fn client_bundle_round_trips_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested").join("client");
        let pki = Pki::generate("test").unwrap();
        pki.write_client_bundle(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CLIENT_KEY_FILE)), 0o600);
        // Certificates are public, but nobody else may rewrite them.
        assert_eq!(mode(&dir.join(CLIENT_CERT_FILE)) & 0o022, 0);
        assert_eq!(load_client_bundle(&dir).unwrap(), pki.client_bundle());
        // No temp files left behind.
        let names: Vec<_> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn server_material_round_trips_and_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("server");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        let first = Pki::generate("one").unwrap();
        first.write_server_material(&dir).unwrap();
        let second = Pki::generate("two").unwrap();
        second.write_server_material(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(SERVER_KEY_FILE)), 0o600);
        assert_eq!(load_server_material(&dir).unwrap(), second.server_material());
    }

    #[test]
    fn load_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let err = load_client_bundle(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("ca.crt") && err.contains("generate"), "{err}");

        Pki::generate("t").unwrap().write_client_bundle(tmp.path()).unwrap();
        // A certificate where the key belongs is a mix-up worth catching early.
        fs::copy(tmp.path().join(CLIENT_CERT_FILE), tmp.path().join(CLIENT_KEY_FILE)).unwrap();
        let err = load_client_bundle(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("tls.key") && err.contains("private key"), "{err}");
    }
}
