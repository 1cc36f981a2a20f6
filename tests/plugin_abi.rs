//! Proof that the plugin ABI is real: plugins written in C (and the Rust template) are compiled, loaded through
//! the C ABI, run their ops, leave the rest to host fallback; broken libraries are rejected with a clear reason
//! while the host carries on; and the C header agrees with the Rust `#[repr(C)]` mirror byte for byte.
//!
//! The C sources are `plugins/examples/minimal_c/minimal.c` and `tests/plugin_fixtures/*.c`, compiled with the
//! system C compiler (`$CC`, else `cc`, `gcc` or `clang`). Without one the C tests say so and skip.

use sd3::runtime::{discover, open_backend, open_backend_in, BackendRequest};
use sd3_core::plugin::abi;
use sd3_core::{Backend, DType, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn c_compiler() -> Option<String> {
    let candidates = std::env::var("CC").into_iter().chain(["cc", "gcc", "clang"].map(String::from));
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// A fresh directory under the system temp dir for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd3-plugin-abi-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compile C sources into a shared library `out`, with the plugin header on the include path.
fn build_shared(cc: &str, sources: &[PathBuf], out: &Path, extra: &[&str]) {
    let mut cmd = Command::new(cc);
    cmd.args(["-std=c99", "-O1", "-Wall", "-Werror", "-shared", "-fPIC"])
        .arg(format!("-I{ROOT}/plugins/include"))
        .args(sources)
        .arg("-o")
        .arg(out)
        .args(extra);
    let o = cmd.output().expect("running the C compiler");
    assert!(o.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

fn lib_name(name: &str) -> String {
    sd3_core::plugin::registry::plugin_file_name(name)
}

/// Build `plugins/examples/minimal_c` into `dir`; `None` (with a message) if there is no C compiler.
fn build_minimal(dir: &Path) -> Option<PathBuf> {
    let Some(cc) = c_compiler() else {
        eprintln!("SKIPPED: no C compiler found (set CC, or install cc/gcc/clang) so the C plugin cannot be built");
        return None;
    };
    let out = dir.join(lib_name("minimal"));
    build_shared(&cc, &[format!("{ROOT}/plugins/examples/minimal_c/minimal.c").into()], &out, &[]);
    Some(out)
}

fn only(plugins: Vec<PathBuf>, dirs: Vec<PathBuf>, backend: &str) -> BackendRequest {
    BackendRequest {
        backend: backend.into(),
        plugins,
        plugin_dirs: dirs,
        search_default_locations: false,
        ..BackendRequest::default()
    }
}

/// Deterministic values in [-1, 1), never all zero.
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn stat(b: &Backend, key: &str) -> u64 {
    let line = b.device().stats().into_iter().find(|l| l.starts_with(&format!("{key}="))).unwrap();
    line[key.len() + 1..].parse().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn c_plugin_runs_add_and_matmul_through_the_abi() {
    let dir = temp_dir("ops");
    let Some(lib) = build_minimal(&dir) else { return };
    let b = open_backend(&only(vec![lib], vec![], "minimal")).unwrap();
    assert_eq!(b.name(), "minimal");
    let info = b.info();
    assert_eq!(info.name, "minimal C example (host memory)");
    assert_eq!(info.dtypes, vec![DType::F32]);
    assert_eq!(info.capabilities, vec!["example=1", "ops=add,matmul"]);

    // add, with broadcasting (a stride-0 operand).
    let (x, row) = (values(12, 1), values(4, 2));
    let tx = b.from_f32(&x, &[3, 4], DType::F32).unwrap();
    let trow = b.from_f32(&row, &[4], DType::F32).unwrap();
    let sum = tx.add(&trow).unwrap().to_f32_vec().unwrap();
    let want: Vec<f32> = (0..12).map(|i| x[i] + row[i % 4]).collect();
    assert_eq!(sum, want, "add runs in f32 on the plugin, so it is exact");

    // matmul: batched [2,3,5] x [5,4], and linear (a transposed, column-major weight) with bias.
    let (a, w) = (values(30, 3), values(20, 4));
    let ta = b.from_f32(&a, &[2, 3, 5], DType::F32).unwrap();
    let tw = b.from_f32(&w, &[5, 4], DType::F32).unwrap();
    let y = ta.matmul(&tw).unwrap().to_f32_vec().unwrap();
    let mut want = vec![0f32; 24];
    for bi in 0..2 {
        for m in 0..3 {
            for n in 0..4 {
                want[bi * 12 + m * 4 + n] =
                    (0..5).map(|k| a[bi * 15 + m * 5 + k] as f64 * w[k * 4 + n] as f64).sum::<f64>() as f32;
            }
        }
    }
    assert_close(&y, &want, 1e-6, "matmul");
    let (wl, bias) = (values(15, 5), values(3, 6)); // nn.Linear weight [out=3, in=5]
    let twl = b.from_f32(&wl, &[3, 5], DType::F32).unwrap();
    let tbias = b.from_f32(&bias, &[3], DType::F32).unwrap();
    let y = ta.linear(&twl, Some(&tbias)).unwrap().to_f32_vec().unwrap();
    let want: Vec<f32> = (0..6 * 3)
        .map(|i| {
            let (row, o) = (i / 3, i % 3);
            (bias[o] as f64 + (0..5).map(|k| a[row * 5 + k] as f64 * wl[o * 5 + k] as f64).sum::<f64>()) as f32
        })
        .collect();
    assert_close(&y, &want, 1e-6, "linear");

    assert_eq!(stat(&b, "adds"), 1);
    assert_eq!(stat(&b, "matmuls"), 2);
    let fallbacks = b.fallback_counts();
    assert!(!fallbacks.contains_key("matmul") && !fallbacks.contains_key("binary.add"), "{fallbacks:?}");
}

/// A small graph: linear → silu → softmax → + residual → mul. Only linear and add run on the C plugin.
fn small_graph(b: &Backend) -> sd3_core::Result<Vec<f32>> {
    let x = b.from_f32(&values(4 * 6, 7), &[4, 6], DType::F32)?;
    let w = b.from_f32(&values(5 * 6, 8), &[5, 6], DType::F32)?;
    let bias = b.from_f32(&values(5, 9), &[5], DType::F32)?;
    let r = b.from_f32(&values(4 * 5, 10), &[4, 5], DType::F32)?;
    let h = x.linear(&w, Some(&bias))?.silu()?.softmax()?;
    let h = h.add(&r)?;
    Tensor::mul(&h, &h.scale(0.5)?)?.to_f32_vec()
}

#[test]
fn c_plugin_graph_runs_the_rest_by_host_fallback() {
    let dir = temp_dir("fallback");
    let Some(lib) = build_minimal(&dir) else { return };
    let want = small_graph(
        &open_backend(&BackendRequest { search_default_locations: false, ..BackendRequest::cpu() }).unwrap(),
    )
    .unwrap();

    let b = open_backend(&only(vec![lib.clone()], vec![], "minimal")).unwrap();
    let got = small_graph(&b).unwrap();
    assert_close(&got, &want, 1e-5, "graph on plugin + fallback vs cpu");
    let fb = b.fallback_counts();
    for op in ["unary.silu", "softmax", "affine", "binary.mul"] {
        assert_eq!(fb.get(op), Some(&1), "{op} should have fallen back once: {fb:?}");
    }
    assert!(!fb.contains_key("matmul") && !fb.contains_key("binary.add"), "{fb:?}");
    assert_eq!((stat(&b, "matmuls"), stat(&b, "adds")), (1, 1));

    // --strict: the first declined op is an error naming it.
    let strict = open_backend(&BackendRequest { strict: true, ..only(vec![lib], vec![], "minimal") }).unwrap();
    let err = small_graph(&strict).unwrap_err().to_string();
    assert!(err.contains("unary.silu") && err.contains("--strict"), "{err}");
}

#[test]
fn broken_libraries_are_rejected_with_a_reason_and_the_host_carries_on() {
    let dir = temp_dir("broken");
    let Some(minimal) = build_minimal(&dir) else { return };
    let cc = c_compiler().unwrap();
    let fixture = |f: &str| PathBuf::from(format!("{ROOT}/tests/plugin_fixtures/{f}"));
    for name in ["wrong_major", "no_entry", "failing_init", "zero_devices", "short_table"] {
        build_shared(&cc, &[fixture(&format!("{name}.c"))], &dir.join(lib_name(name)), &[]);
    }
    // A plugin needing a runtime library that is not installed: link against a stub, then delete the stub.
    let runtime_dir = dir.join("runtime");
    std::fs::create_dir_all(&runtime_dir).unwrap();
    let stub = runtime_dir.join("libsd3_fixture_missing_runtime.so");
    build_shared(&cc, &[fixture("missing_dependency_runtime.c")], &stub, &[]);
    let link = [format!("-L{}", runtime_dir.display()), "-lsd3_fixture_missing_runtime".to_string()];
    let link: Vec<&str> = link.iter().map(String::as_str).collect();
    build_shared(&cc, &[fixture("missing_dependency.c")], &dir.join(lib_name("needs_runtime")), &link);
    std::fs::remove_file(&stub).unwrap();

    let req = only(vec![PathBuf::from("/nonexistent/libsd3_backend_ghost.so")], vec![dir.clone()], "minimal");
    let reg = discover(&req);
    let reason = |file: &str| -> String {
        let path = if file.starts_with('/') { PathBuf::from(file) } else { dir.join(file) };
        reg.rejected
            .iter()
            .find(|r| r.origin == sd3_core::plugin::Origin::Library(path.clone()))
            .unwrap_or_else(|| panic!("{} not rejected; rejected: {:?}", path.display(), reg.rejected))
            .reason
            .clone()
    };
    let r = reason(&lib_name("wrong_major"));
    let host = format!("{}.{}", abi::ABI_MAJOR, abi::ABI_MINOR);
    assert!(r.contains("ABI major version mismatch") && r.contains("99.3") && r.contains(&host), "{r}");
    let r = reason(&lib_name("no_entry"));
    assert!(r.contains("no `sd3_backend_entry` symbol"), "{r}");
    let r = reason(&lib_name("failing_init"));
    assert!(r.contains("init failed") && r.contains("simulated driver failure: libfake_driver.so.1 not found"), "{r}");
    let r = reason(&lib_name("needs_runtime"));
    assert!(r.contains("cannot load the library") && r.contains("libsd3_fixture_missing_runtime.so"), "{r}");
    let r = reason(&lib_name("zero_devices"));
    assert!(r.contains("no devices: no accelerator found on PCI bus"), "{r}");
    let r = reason(&lib_name("short_table"));
    assert!(r.contains("plugin table too small"), "{r}");
    let r = reason("/nonexistent/libsd3_backend_ghost.so");
    assert!(r.contains("file not found"), "{r}");
    assert_eq!(reg.rejected.len(), 7, "{:?}", reg.rejected);

    // The host carries on: the CPU and the good plugin are there and work.
    assert_eq!(reg.names(), vec!["cpu", "minimal"]);
    let b = open_backend_in(&reg, &req).unwrap();
    assert_eq!(
        b.from_f32(&[1.0, 2.0], &[2], DType::F32)
            .unwrap()
            .add(&b.from_f32(&[3.0, 4.0], &[2], DType::F32).unwrap())
            .unwrap()
            .to_f32_vec()
            .unwrap(),
        vec![4.0, 6.0]
    );
    assert_eq!(reg.from_library(&minimal).map(|b| b.name.as_str()), Some("minimal"));

    // Asking for a rejected backend explains why it is not there.
    let Err(err) = open_backend_in(&reg, &BackendRequest { backend: "failing_init".into(), ..req.clone() }) else {
        panic!("a rejected backend opened")
    };
    let err = err.to_string();
    assert!(err.contains("no backend named `failing_init`") && err.contains("simulated driver failure"), "{err}");
    assert!(err.contains("Available: cpu, minimal"), "{err}");

    // The same library reached twice (explicit path and directory) loads once; a second library with a taken
    // name is reported as shadowed.
    let copy_dir = dir.join("copy");
    std::fs::create_dir_all(&copy_dir).unwrap();
    std::fs::copy(&minimal, copy_dir.join(lib_name("minimal"))).unwrap();
    let reg = discover(&only(vec![minimal.clone()], vec![dir.clone(), copy_dir.clone()], "minimal"));
    let shadowed: Vec<_> = reg.rejected.iter().filter(|r| r.reason.contains("shadowed")).collect();
    assert_eq!(shadowed.len(), 1, "{:?}", reg.rejected);
    assert_eq!(shadowed[0].origin, sd3_core::plugin::Origin::Library(copy_dir.join(lib_name("minimal"))));
    assert_eq!(reg.backends.iter().filter(|b| b.name == "minimal").count(), 1);
}

#[test]
fn c_header_layout_matches_the_rust_mirror() {
    let Some(cc) = c_compiler() else {
        eprintln!("SKIPPED: no C compiler found (set CC, or install cc/gcc/clang)");
        return;
    };
    let dir = temp_dir("layout");
    let mut src =
        String::from("#include <stddef.h>\n#include <stdio.h>\n#include \"sd3_plugin.h\"\nint main(void) {\n");
    for (name, _) in abi::layout_table() {
        let expr = match name.strip_prefix("sizeof(") {
            Some(ty) => format!("sizeof({}", ty),
            None => {
                let (ty, field) = name.split_once('.').unwrap();
                format!("offsetof({ty}, {field})")
            }
        };
        src.push_str(&format!("    printf(\"%s %llu\\n\", \"{name}\", (unsigned long long){expr});\n"));
    }
    for (name, _) in abi::constant_table() {
        src.push_str(&format!("    printf(\"%s %lld\\n\", \"{name}\", (long long){name});\n"));
    }
    src.push_str("    return 0;\n}\n");
    let c = dir.join("layout.c");
    std::fs::write(&c, src).unwrap();
    let exe = dir.join("layout");
    let o = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Werror", "-pedantic"])
        .arg(format!("-I{ROOT}/plugins/include"))
        .arg(&c)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(o.status.success(), "compiling the layout probe failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let out = Command::new(&exe).output().unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    let c_values: Vec<(String, i128)> = printed
        .lines()
        .map(|l| {
            let (n, v) = l.rsplit_once(' ').unwrap();
            (n.to_string(), v.parse().unwrap())
        })
        .collect();
    let rust_values: Vec<(String, i128)> = abi::layout_table()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v as i128))
        .chain(abi::constant_table().into_iter().map(|(n, v)| (n, v as i128)))
        .collect();
    assert_eq!(c_values.len(), rust_values.len());
    let mismatches: Vec<String> = c_values
        .iter()
        .zip(&rust_values)
        .filter(|(c, r)| c != r)
        .map(|(c, r)| format!("{}: C {} vs Rust {}", c.0, c.1, r.1))
        .collect();
    assert!(mismatches.is_empty(), "sd3_plugin.h and core/src/plugin/abi.rs disagree:\n{}", mismatches.join("\n"));

    // Every numeric `#define SD3_*` of the header is in the Rust table too (so nothing is added on one side only).
    let header = std::fs::read_to_string(format!("{ROOT}/plugins/include/sd3_plugin.h")).unwrap();
    let defined: std::collections::BTreeSet<String> = header
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("#define ")?.split_whitespace();
            let (name, value) = (w.next()?, w.next()?);
            (name.starts_with("SD3_") && value.chars().all(|c| c.is_ascii_digit() || "()+".contains(c)))
                .then(|| name.to_string())
        })
        .collect();
    let mirrored: std::collections::BTreeSet<String> = abi::constant_table().into_iter().map(|(n, _)| n).collect();
    let only_header: Vec<_> = defined.difference(&mirrored).collect();
    let only_rust: Vec<_> = mirrored.difference(&defined).collect();
    assert!(
        only_header.is_empty() && only_rust.is_empty(),
        "SD3_* constants only in the header: {only_header:?}; only in core/src/plugin/abi.rs: {only_rust:?}"
    );
}

/// `cargo build -p sd3-backend-template` (same profile as this test), then load the cdylib through the ABI.
#[test]
fn rust_template_plugin_loads_through_the_abi() {
    let profile_dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "-p", "sd3-backend-template", "--manifest-path"]).arg(format!("{ROOT}/Cargo.toml"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let o = cmd.output().expect("running cargo");
    assert!(o.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let lib = profile_dir.join(lib_name("template"));
    assert!(lib.is_file(), "{} was not built", lib.display());

    {
        let b = open_backend(&only(vec![lib.clone()], vec![], "template")).unwrap();
        assert_eq!(b.info().name, "template device");
        let ones = b.full(&[2, 3], DType::F32, 1.5).unwrap();
        let x = b.from_f32(&[1., 2., 3., 4., 5., 6.], &[2, 3], DType::F32).unwrap();
        let y = x.add(&ones).unwrap().mul(&x).unwrap(); // fill, add on the plugin; mul by fallback
        assert_eq!(y.to_f32_vec().unwrap(), vec![2.5, 7., 13.5, 22., 32.5, 45.]);
        let fb = b.fallback_counts();
        assert_eq!(fb.get("binary.mul"), Some(&1), "{fb:?}");
        // The template has no timing markers: the shim answers UNSUPPORTED, the host reports none.
        assert_eq!(b.device().record_marker().unwrap(), None);
        assert!(!fb.contains_key("fill") && !fb.contains_key("binary.add"), "{fb:?}");

        // While its devices live, a second discovery shares the initialised plugin; other options are refused.
        let again = discover(&only(vec![lib.clone()], vec![], "template"));
        assert_eq!(again.names(), vec!["cpu", "template"]);
        assert_eq!(again.get("template").unwrap().provider.open_device(0).unwrap().info().name, "template device");
        let other = discover(&BackendRequest {
            options: "template.label=x".into(),
            ..only(vec![lib.clone()], vec![], "template")
        });
        assert!(other.rejected[0].reason.contains("already initialised in this process"), "{:?}", other.rejected);
    }
    // Everything from the first initialisation is dropped (shutdown ran), so init runs again.
    // Options reach init; an init error comes back as the plugin's message.
    let reg = discover(&BackendRequest { options: "template.fail=1".into(), ..only(vec![lib], vec![], "template") });
    let r = &reg.rejected[0].reason;
    assert!(r.contains("init failed") && r.contains("template.fail=1"), "{r}");
}

/// ABI 1.1 timing markers through the C table: device seconds come back, every marker is released; a 1.0-sized
/// device table (same pointers past its `struct_size`) and a plugin answering UNSUPPORTED both mean "no markers".
#[test]
fn c_plugin_timing_markers_and_their_absence() {
    let Some(cc) = c_compiler() else {
        eprintln!("SKIPPED: no C compiler found (set CC, or install cc/gcc/clang)");
        return;
    };
    let build = |variant: &str, defines: &[&str]| {
        let dir = temp_dir(&format!("markers-{variant}"));
        let lib = dir.join(lib_name("markers"));
        build_shared(&cc, &[format!("{ROOT}/tests/plugin_fixtures/markers.c").into()], &lib, defines);
        open_backend(&only(vec![lib], vec![], "markers")).unwrap()
    };

    let b = build("1_1", &[]);
    assert_eq!(stat(&b, "record_calls"), 0);
    let device = b.device();
    let timer = sd3_core::DeviceTimer::start(device).unwrap();
    assert!(timer.is_timing());
    // Markers 100 and 101 on the fixture's clock of 1/8 s per marker.
    assert_eq!(timer.stop().unwrap(), Some(0.125));
    assert_eq!((stat(&b, "recorded"), stat(&b, "released")), (2, 2));
    // A plugin error comes back with its message.
    let e = device.marker_elapsed(sd3_core::MarkerId(7), sd3_core::MarkerId(9)).unwrap_err().to_string();
    assert!(e.contains("unknown markers 7..9"), "{e}");
    drop(b);

    let b = build("1_0", &["-DTABLE_1_0"]);
    assert_eq!(b.device().record_marker().unwrap(), None);
    assert!(!sd3_core::DeviceTimer::start(b.device()).unwrap().is_timing());
    assert!(b.device().marker_elapsed(sd3_core::MarkerId(100), sd3_core::MarkerId(101)).is_err());
    b.device().release_marker(sd3_core::MarkerId(100));
    assert_eq!((stat(&b, "record_calls"), stat(&b, "elapsed_calls"), stat(&b, "released")), (0, 0, 0));

    let b = build("decline", &["-DDECLINE_MARKERS"]);
    assert_eq!(b.device().record_marker().unwrap(), None);
    assert_eq!(b.device().record_marker().unwrap(), None);
    assert_eq!(stat(&b, "record_calls"), 1, "the host stops asking after UNSUPPORTED");
}

/// The C plugin passes the conformance suite for every case it accepts (the rest is reported unsupported).
#[test]
fn c_plugin_passes_conformance_for_what_it_claims() {
    let dir = temp_dir("conformance");
    let Some(lib) = build_minimal(&dir) else { return };
    let b = open_backend(&only(vec![lib], vec![], "minimal")).unwrap();
    let report = sd3_core::conformance::run(b.device().as_ref(), &Default::default());
    let failures: Vec<String> =
        report.failures().map(|r| format!("{} {} {}: {:?}", r.op, r.dtype, r.shape, r.status)).collect();
    assert!(failures.is_empty(), "{}\n{}", report.summary(), failures.join("\n"));
    eprintln!("{}", report.summary());
    let passed = |op: &str| report.results.iter().filter(|r| r.op == op && r.status.label() == "pass").count();
    assert!(passed("binary.add") > 0 && passed("matmul") > 0, "{}", report.summary());
    let claimed_elsewhere =
        report.results.iter().filter(|r| r.status.label() == "pass" && r.op != "binary.add" && r.op != "matmul");
    assert_eq!(claimed_elsewhere.count(), 0, "the plugin only implements add and matmul");
}

/// `sd3 devices`: plugins from `--plugin-dir` and `SD3_PLUGIN_PATH`, and the rejected ones with their reasons,
/// in the table and in `--json`.
#[test]
fn sd3_devices_lists_backends_devices_and_rejections() {
    let dir = temp_dir("devices");
    let Some(_) = build_minimal(&dir) else { return };
    let env_dir = dir.join("from_env");
    std::fs::create_dir_all(&env_dir).unwrap();
    let cc = c_compiler().unwrap();
    build_shared(
        &cc,
        &[format!("{ROOT}/tests/plugin_fixtures/wrong_major.c").into()],
        &env_dir.join(lib_name("wrong_major")),
        &[],
    );
    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sd3"));
        cmd.args(["devices", "--plugin-dir"]).arg(&dir).env(sd3_core::plugin::PLUGIN_PATH_ENV, &env_dir);
        if json {
            cmd.arg("--json");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    let backend = |name: &str| v["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).cloned();
    assert_eq!(backend("cpu").unwrap()["origin"], "built-in");
    let minimal = backend("minimal").unwrap();
    assert_eq!(minimal["origin"], dir.join(lib_name("minimal")).display().to_string());
    assert_eq!(minimal["abi"], format!("{}.{}", abi::ABI_MAJOR, abi::ABI_MINOR));
    let dev = &minimal["devices"][0];
    assert_eq!((dev["kind"].as_str(), dev["dtypes"][0].as_str()), (Some("CPU"), Some("f32")));
    assert_eq!(dev["name"], "minimal C example (host memory)");
    let rejected = v["rejected"].as_array().unwrap();
    let wrong = rejected.iter().find(|r| r["origin"] == env_dir.join(lib_name("wrong_major")).display().to_string());
    assert!(wrong.unwrap()["reason"].as_str().unwrap().contains("ABI major version mismatch"), "{rejected:?}");

    let table = run(false);
    assert!(table.contains("minimal 1.0.0") && table.contains("Found but rejected:"), "{table}");
    assert!(table.contains("ABI major version mismatch"), "{table}");
}

#[test]
fn open_backend_errors_say_what_is_available() {
    let msg = |req: &BackendRequest| match open_backend(req) {
        Ok(_) => panic!("{req:?} opened"),
        Err(e) => format!("{e:#}"),
    };
    let e = msg(&only(vec![], vec![], "nosuch"));
    assert!(e.contains("no backend named `nosuch`") && e.contains("Available: cpu"), "{e}");
    assert!(e.contains("No plugin library was found") && e.contains(&lib_name("nosuch")), "{e}");
    let e = msg(&BackendRequest { device: 3, ..only(vec![], vec![], "cpu") });
    assert!(e.contains("backend `cpu` has 1 device(s); --device 3 is out of range"), "{e}");
}
