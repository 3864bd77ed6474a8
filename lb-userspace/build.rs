use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the XDP/TC object with the nightly toolchain and bpf-linker (see `cargo xtask
/// setup`). `AYA_BUILD_SKIP=1` skips it and writes an empty object so that `cargo check` and
/// `clippy` stay fast; a daemon built that way refuses to start with a message saying so.
fn main() -> anyhow::Result<()> {
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    let object = std::path::Path::new(&out_dir).join("lb-ebpf");
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        std::fs::write(&object, b"").context("writing stub eBPF object")?;
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let cargo_metadata::Package { name, manifest_path, .. } = ebpf_package;
    let root_dir = manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
        .as_str();
    aya_build::build_ebpf(
        [Package { name: name.as_str(), root_dir, ..Default::default() }],
        Toolchain::default(),
    )
}
