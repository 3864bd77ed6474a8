/// The eBPF object is linked by bpf-linker, which cargo cannot see as a dependency: rebuild when
/// the binary changes.
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
