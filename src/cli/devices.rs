//! `sd3 devices`: every backend found, its devices, and every plugin library found but rejected (with why).

use clap::Args;
use sd3_core::plugin::{Origin, Registry};
use sd3_core::DeviceInfo;
use serde_json::{json, Value};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub backend: super::common::BackendArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One backend as listed: its devices, or the error opening each.
struct Listed {
    name: String,
    version: String,
    origin: Origin,
    abi: Option<(u32, u32)>,
    devices: Vec<Result<DeviceInfo, String>>,
}

fn list(registry: &Registry) -> Vec<Listed> {
    registry
        .backends
        .iter()
        .map(|b| Listed {
            name: b.name.clone(),
            version: b.version.clone(),
            origin: b.origin.clone(),
            abi: b.abi_version,
            devices: (0..b.provider.device_count())
                .map(|i| b.provider.open_device(i).map(|d| d.info()).map_err(|e| e.to_string()))
                .collect(),
        })
        .collect()
}

pub fn run(args: DevicesArgs) -> anyhow::Result<ExitCode> {
    let registry = sd3::runtime::discover(&args.backend.request());
    let listed = list(&registry);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&listed, &registry))?);
    } else {
        print_table(&listed, &registry);
    }
    Ok(ExitCode::SUCCESS)
}

fn origin_json(o: &Origin) -> Value {
    match o {
        Origin::Builtin => json!("built-in"),
        Origin::Library(p) => json!(p.display().to_string()),
    }
}

fn to_json(listed: &[Listed], registry: &Registry) -> Value {
    let backends: Vec<Value> = listed
        .iter()
        .map(|b| {
            let devices: Vec<Value> = b
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Ok(info) => json!({
                        "index": i,
                        "name": info.name,
                        "kind": info.kind.name(),
                        "memory_bytes": info.memory_bytes,
                        "free_memory_bytes": info.free_memory_bytes,
                        "pci_id": info.pci_id,
                        "dtypes": info.dtypes.iter().map(|d| d.name()).collect::<Vec<_>>(),
                        "capabilities": info.capabilities,
                    }),
                    Err(e) => json!({ "index": i, "error": e }),
                })
                .collect();
            json!({
                "name": b.name,
                "version": b.version,
                "origin": origin_json(&b.origin),
                "abi": b.abi.map(|(ma, mi)| format!("{ma}.{mi}")),
                "devices": devices,
            })
        })
        .collect();
    let rejected: Vec<Value> = registry
        .rejected
        .iter()
        .map(|r| json!({ "origin": origin_json(&r.origin), "name": r.name, "reason": r.reason }))
        .collect();
    json!({ "backends": backends, "rejected": rejected })
}

fn bytes(n: u64) -> String {
    if n == 0 {
        return "-".into();
    }
    format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)
}

fn print_table(listed: &[Listed], registry: &Registry) {
    for b in listed {
        let abi = b.abi.map(|(ma, mi)| format!(", ABI {ma}.{mi}")).unwrap_or_default();
        println!("{} {} ({}{abi})", b.name, b.version, b.origin);
        println!(
            "  {:<3} {:<5} {:<32} {:>10} {:>10} {:<13} {:<24} capabilities",
            "#", "kind", "name", "memory", "free", "pci", "dtypes"
        );
        for (i, d) in b.devices.iter().enumerate() {
            match d {
                Ok(info) => {
                    let dtypes: Vec<&str> = info.dtypes.iter().map(|d| d.name()).collect();
                    println!(
                        "  {:<3} {:<5} {:<32} {:>10} {:>10} {:<13} {:<24} {}",
                        i,
                        info.kind.name(),
                        info.name,
                        bytes(info.memory_bytes),
                        bytes(info.free_memory_bytes),
                        info.pci_id.as_deref().unwrap_or("-"),
                        dtypes.join(","),
                        info.capabilities.join(" ")
                    );
                }
                Err(e) => println!("  {i:<3} error: {e}"),
            }
        }
    }
    if !registry.rejected.is_empty() {
        println!();
        println!("Found but rejected:");
        for r in &registry.rejected {
            let name = r.name.as_deref().map(|n| format!(" [{n}]")).unwrap_or_default();
            println!("  {}{name}: {}", r.origin, r.reason);
        }
    }
}
