fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from a crate so that no machine needs a system protobuf compiler.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("flotilla_descriptor.bin"))
        .compile_protos(
            &[
                "flotilla/v1/admin.proto",
                "flotilla/v1/agent.proto",
                "flotilla/v1/cluster.proto",
                "flotilla/v1/access.proto",
                "flotilla/v1/settings.proto",
                "flotilla/v1/audit.proto",
                "flotilla/v1/internal.proto",
                "flotilla/v1/secret.proto",
            ],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=flotilla");
    Ok(())
}
