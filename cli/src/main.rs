//! `kiln`: bake immutable appliances from a TOML recipe.

mod progress;
mod run;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_assemble::cache::Cache;
use kiln_assemble::image::{self, BuildOptions};
use kiln_assemble::recipe;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// The static kiln-init, built and embedded by build.rs.
static INIT: &[u8] = include_bytes!(env!("KILN_INIT_PATH"));

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Bake immutable appliances: a TOML recipe to a bootable disk image"
)]
struct Cli {
    /// No progress output.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the recipe's images into a directory.
    Build {
        recipe: PathBuf,
        /// Output directory; images are written as DIR/NAME.FORMAT.
        #[arg(long, short, default_value = "out")]
        output: PathBuf,
        /// Content-addressed cache (default: $XDG_CACHE_HOME/kiln).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// OpenPGP keyring that signs the Debian archive.
        #[arg(long, default_value = kiln_assemble::debian::DEFAULT_KEYRING)]
        keyring: PathBuf,
    },
    /// Check a recipe without building it.
    Validate { recipe: PathBuf },
    /// Boot an image in QEMU with UEFI firmware; the serial console is
    /// this terminal. Exits 0 when the guest powers off.
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate { recipe: path } => {
            let v = recipe::load(&path)?;
            if !cli.quiet {
                println!(
                    "{}: ok ({} onboot, {} services)",
                    path.display(),
                    v.recipe.onboot.len(),
                    v.recipe.services.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Build {
            recipe: path,
            output,
            cache,
            keyring,
        } => {
            let started = Instant::now();
            let v = recipe::load(&path)?;
            let cache = Cache::open(cache.unwrap_or_else(Cache::default_dir))
                .context("opening the cache")?;
            let progress = progress::Reporter::new(cli.quiet);
            let opts = BuildOptions {
                cache,
                keyring,
                init: Arc::new(INIT.to_vec()),
                progress: progress.clone(),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let built = rt.block_on(image::build(&v, &output, &opts));
            progress.finish();
            let built = built?;
            if !cli.quiet {
                for img in &built.images {
                    let len = std::fs::metadata(img).map(|m| m.len()).unwrap_or(0);
                    println!(
                        "{} ({} MiB disk; root {:.1} MiB, ESP {} MiB; kernel {}) in {:.1}s",
                        img.display(),
                        len >> 20,
                        built.root_size as f64 / (1 << 20) as f64,
                        built.esp_size >> 20,
                        built.plan.kernel.release,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => run::run(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded init must be a static ELF executable: no PT_INTERP.
    #[test]
    fn embedded_init_is_static_elf() {
        assert_eq!(&INIT[..4], b"\x7fELF");
        assert_eq!(INIT[4], 2, "64-bit");
        let phoff = u64::from_le_bytes(INIT[0x20..0x28].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([INIT[0x36], INIT[0x37]]) as usize;
        let phnum = u16::from_le_bytes([INIT[0x38], INIT[0x39]]) as usize;
        for i in 0..phnum {
            let p = phoff + i * phentsize;
            let kind = u32::from_le_bytes(INIT[p..p + 4].try_into().unwrap());
            assert_ne!(kind, 3, "kiln-init has an ELF interpreter: not static");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
