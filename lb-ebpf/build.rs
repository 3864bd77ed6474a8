/// The eBPF object is linked by bpf-linker. Two things here:
/// - rebuild when the bpf-linker binary changes (cargo cannot see it as a dependency);
/// - enable alu32 (BPF ISA v3 atomics): the data path uses atomic compare-and-swap and fetch-add
///   (BPF_ATOMIC, kernel 5.12+) so a flow's close decrements its backend exactly once.
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if arch == "bpf" {
        // rustc already passes `--cpu generic` to bpf-linker; alu32 enables the atomic
        // fetch-add and compare-and-swap instructions on top of it.
        println!("cargo:rustc-link-arg=--cpu-features=+alu32");
    }
}
