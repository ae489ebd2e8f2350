//! `flotilla env check` and `flotilla image build`: the machine side of the binary, run on a
//! node's host.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use flotilla_sandbox::{BaseImage, BwrapConfig, BwrapDriver, MachineDriver};

#[derive(clap::Args, Debug)]
pub struct EnvCheckArgs {
    /// A checkout of the repository.
    pub dir: PathBuf,
    /// Base image the plan is for.
    #[arg(long, default_value = "host")]
    pub base: String,
}

/// Prints the plan for a checkout's environment.json, or the error; non-zero on error.
pub fn env_check(args: EnvCheckArgs) -> anyhow::Result<ExitCode> {
    let base: BaseImage = args.base.parse().map_err(|error| anyhow::anyhow!("--base: {error}"))?;
    if !args.dir.is_dir() {
        anyhow::bail!("{} is not a directory", args.dir.display());
    }
    match flotilla_sandbox::environment::check(&args.dir, base) {
        Ok(plan) => {
            println!("{plan}");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("error: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ImageBuildArgs {
    /// `debian` (debootstrap with git, build-essential, curl, ca-certificates, tmux) or `host`.
    pub image: String,
    /// The node's data dir; the image goes under DATA_DIR/machines/images.
    #[arg(long)]
    pub data_dir: PathBuf,
}

pub async fn image_build(args: ImageBuildArgs) -> anyhow::Result<ExitCode> {
    let image: BaseImage = args.image.parse().map_err(|error| anyhow::anyhow!("{error}"))?;
    let driver = BwrapDriver::new(BwrapConfig::new(args.data_dir.join("machines")))?;
    let started = Instant::now();
    let layer = driver.prepare_base(image).await?;
    println!(
        "base image {image} ready at {} in {:.1}s",
        layer.rootfs.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
