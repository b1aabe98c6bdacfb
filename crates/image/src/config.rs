//! `image.json`, beside an unpacked root: what the image says to run and how, in a shape other
//! crates read without knowing OCI ([`ImageConfig`]), and the process it describes ([`Workload`]).

use oci_spec::image::ImageConfiguration;
use openshell_artifacts::Digest;
use serde::{Deserialize, Serialize};

/// The parts of an image's config a runtime needs, plus where the image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// The manifest's digest: the image's identity, and its store key.
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub os: String,
    pub architecture: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value`, as the image lists them.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `80/tcp`, `53/udp`, …
    pub exposed_ports: Vec<String>,
    /// Entries in the root (files, directories, links, nodes), not counting the root itself.
    pub entries: u64,
    /// Unpacked without root: owners are the unpacker's and device nodes are missing, so the
    /// tree is for reading, not for booting.
    pub rootless: bool,
}

impl ImageConfig {
    pub(crate) fn from_oci(
        config: &ImageConfiguration,
        manifest_digest: Digest,
        config_digest: Digest,
        entries: u64,
        rootless: bool,
    ) -> ImageConfig {
        let c = config.config().clone().unwrap_or_default();
        let mut exposed_ports = c.exposed_ports().clone().unwrap_or_default();
        exposed_ports.sort();
        ImageConfig {
            manifest_digest,
            config_digest,
            os: config.os().to_string(),
            architecture: config.architecture().to_string(),
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().filter(|w| !w.is_empty()),
            user: c.user().clone().filter(|u| !u.is_empty()),
            exposed_ports,
            entries,
            rootless,
        }
    }
}

/// The process an image runs by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Entrypoint then Cmd (the OCI rule: Cmd is the Entrypoint's default arguments, or the
    /// command itself when there is no Entrypoint). Empty when the image names neither.
    pub argv: Vec<String>,
    /// `(NAME, value)`; a bare `NAME` has an empty value.
    pub env: Vec<(String, String)>,
    /// The working directory, `/` when the image names none.
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid`, as the image says; `None` is root.
    pub user: Option<String>,
}

impl Workload {
    pub fn from_config(config: &ImageConfig) -> Workload {
        Workload {
            argv: config.entrypoint.iter().chain(&config.cmd).cloned().collect(),
            env: config
                .env
                .iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (kv.clone(), String::new()),
                })
                .collect(),
            cwd: config.working_dir.clone().unwrap_or_else(|| "/".into()),
            user: config.user.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ImageConfig {
        let oci: ImageConfiguration = serde_json::from_str(json).unwrap();
        ImageConfig::from_oci(&oci, Digest::of_bytes(b"m"), Digest::of_bytes(b"c"), 3, false)
    }

    #[test]
    fn workload_is_entrypoint_then_cmd_with_env_cwd_and_user() {
        let c = config(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
                "config":{"Entrypoint":["/bin/tini","--"],"Cmd":["serve","-v"],"Env":["PATH=/usr/bin","A=b=c","BARE"],
                          "WorkingDir":"/srv","User":"1000:1000","ExposedPorts":{"8080/tcp":{},"53/udp":{}}}}"#,
        );
        assert_eq!(c.exposed_ports, ["53/udp", "8080/tcp"]);
        let w = Workload::from_config(&c);
        assert_eq!(w.argv, ["/bin/tini", "--", "serve", "-v"]);
        assert_eq!(
            w.env,
            [("PATH".into(), "/usr/bin".into()), ("A".into(), "b=c".into()), ("BARE".into(), String::new())]
        );
        assert_eq!(w.cwd, "/srv");
        assert_eq!(w.user.as_deref(), Some("1000:1000"));
    }

    #[test]
    fn an_image_without_a_config_section_runs_nothing_as_root_in_slash() {
        let c = config(r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
        let w = Workload::from_config(&c);
        assert!(w.argv.is_empty() && w.env.is_empty());
        assert_eq!(w.cwd, "/");
        assert_eq!(w.user, None);
    }

    #[test]
    fn image_json_round_trips() {
        let c = config(r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ImageConfig>(&text).unwrap(), c);
    }
}
