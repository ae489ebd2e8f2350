//! Prints machine start figures (warm and cold); asserts nothing about time. Needs root.
//! Arguments: number of warm starts (default 200), number of cold starts (default 10),
//! and `ext4` to back the writable layers with an ext4 image instead of a tmpfs.

use flotilla_sandbox::bench::bench_machine_starts;
use flotilla_sandbox::DiskBacking;

fn main() {
    let arguments: Vec<String> = std::env::args()
        .skip(1)
        .filter(|argument| !argument.starts_with("--"))
        .collect();
    let numbers: Vec<usize> = arguments.iter().filter_map(|argument| argument.parse().ok()).collect();
    let warm_starts = numbers.first().copied().unwrap_or(200);
    let cold_starts = numbers.get(1).copied().unwrap_or(10);
    let disk = if arguments.iter().any(|argument| argument == "ext4") {
        DiskBacking::Ext4Image
    } else {
        DiskBacking::Tmpfs
    };
    let scratch = tempfile::Builder::new()
        .prefix("flotilla-bench-machines")
        .tempdir()
        .expect("scratch dir");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(bench_machine_starts(scratch.path(), disk, warm_starts, cold_starts)) {
        Ok(figures) => print!("{figures}"),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
