fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // `marsadm view --json` prints these messages as they are.
        .type_attribute(".mars.v1", "#[derive(serde::Serialize)]")
        .compile_with_config(config, &["proto/marsd.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/marsd.proto");
    Ok(())
}
