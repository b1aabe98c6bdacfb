//! `cargo xtask verify`: the verification matrix of a running gateway instance (rows, `--json`).
//! Exit 0 when every required row passes, 1 when one fails, 2 when there was nothing to verify
//! (no such instance, unreadable metadata). The checks live in `openshell_instance::verify`.

use openshell_instance::state::{self, GatewayInstance};

#[derive(clap::Args)]
pub struct VerifyCmd {
    /// The gateway instance (default: the active one, the last that became ready)
    #[arg(long)]
    name: Option<String>,
    /// Machine-readable output: {subject, ok, exit_code, rows:[{id, status, required, reason, fix}]}, or
    /// {subject, ok: false, exit_code: 2, error} when there is nothing to verify
    #[arg(long)]
    json: bool,
}

impl VerifyCmd {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        let root = state::gateways_root();
        let matrix = self
            .name
            .or_else(|| state::active(&root))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no active gateway under {}; start one with `cargo xtask vm run --detach` or pass --name",
                    root.display()
                )
            })
            .and_then(|name| Ok(GatewayInstance::new(&root, &name)?))
            .and_then(|inst| Ok(openshell_instance::verify::verify(&inst)?));
        let matrix = match matrix {
            Ok(m) => m,
            Err(e) => {
                eprintln!("verify: {e:#}");
                if self.json {
                    // A consumer of --json gets a document on every exit, as from `check --guest`.
                    let code = openshell_matrix::EXIT_CHECKER_FAILED;
                    println!(
                        "{}",
                        serde_json::json!({"subject": "verify", "ok": false, "exit_code": code, "error": format!("{e:#}")})
                    );
                }
                return Ok(crate::exit_code(openshell_matrix::EXIT_CHECKER_FAILED));
            }
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&matrix.to_json())?);
        } else {
            print!("{}", matrix.render());
        }
        Ok(crate::exit_code(matrix.exit_code()))
    }
}
