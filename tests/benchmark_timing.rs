//! `--benchmark` device timings: the pipeline records device markers at every stage and step boundary only when
//! asked, reports device seconds next to wall seconds, and releases every marker; the CLI prints both columns,
//! with "-" for a device without markers (the CPU backend).

mod common;
use common::*;
use sd3::pipeline::{GenerationRequest, PipelineOptions, StableDiffusion3Pipeline};
use sd3_core::{Backend, BufferId, Device, DeviceInfo, MarkerId, OpCall, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// The CPU device with a fake device clock: every executed op takes 1 ms, and markers read that clock.
struct Clocked {
    cpu: Arc<dyn Device>,
    clock: Mutex<Clock>,
}
#[derive(Default)]
struct Clock {
    now: f64,
    next: u64,
    live: BTreeMap<u64, f64>,
    recorded: usize,
}

impl Device for Clocked {
    fn info(&self) -> DeviceInfo {
        self.cpu.info()
    }
    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        self.cpu.alloc(bytes)
    }
    fn free(&self, b: BufferId) {
        self.cpu.free(b)
    }
    fn upload(&self, b: BufferId, o: usize, d: &[u8]) -> Result<()> {
        self.cpu.upload(b, o, d)
    }
    fn download(&self, b: BufferId, o: usize, d: &mut [u8]) -> Result<()> {
        self.cpu.download(b, o, d)
    }
    fn copy_buffer(&self, s: BufferId, so: usize, d: BufferId, d_o: usize, n: usize) -> Result<()> {
        self.cpu.copy_buffer(s, so, d, d_o, n)
    }
    fn supports(&self, call: &OpCall) -> bool {
        self.cpu.supports(call)
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        self.clock.lock().unwrap().now += 1e-3;
        self.cpu.execute(call)
    }
    fn synchronize(&self) -> Result<()> {
        self.cpu.synchronize()
    }
    fn record_marker(&self) -> Result<Option<MarkerId>> {
        let mut c = self.clock.lock().unwrap();
        c.next += 1;
        let (id, now) = (c.next, c.now);
        c.live.insert(id, now);
        c.recorded += 1;
        Ok(Some(MarkerId(id)))
    }
    fn marker_elapsed(&self, start: MarkerId, end: MarkerId) -> Result<f64> {
        let c = self.clock.lock().unwrap();
        Ok(c.live[&end.0] - c.live[&start.0])
    }
    fn release_marker(&self, m: MarkerId) {
        self.clock.lock().unwrap().live.remove(&m.0);
    }
}

fn tiny_pipeline(device: Arc<dyn Device>) -> StableDiffusion3Pipeline {
    let dir = sd3::bundled::tiny_model_dir().unwrap();
    let options = PipelineOptions { no_t5: true, ..PipelineOptions::default() };
    StableDiffusion3Pipeline::new(&dir, Backend::new("clocked", device), options).unwrap()
}

#[test]
fn the_pipeline_reports_device_seconds_only_when_asked() {
    let clocked = Arc::new(Clocked { cpu: sd3_backend_cpu::cpu_device(), clock: Mutex::default() });
    let pipe = tiny_pipeline(clocked.clone());
    let mut r = GenerationRequest::new("a cat", 64, 64);
    r.steps = 2;

    // Off: no marker is recorded, and every device figure is None.
    let g = pipe.generate(&r, &mut |_| {}).unwrap();
    assert_eq!(clocked.clock.lock().unwrap().recorded, 0);
    let rep = &g.report;
    assert_eq!(rep.stage_device_seconds.len(), rep.stages.len());
    assert!(rep.stage_device_seconds.iter().chain(&rep.step_device_seconds).all(Option::is_none));
    assert_eq!(rep.total_device_seconds, None);

    // On: a figure for every stage and step, from the device's clock, and every marker released.
    r.device_timing = true;
    let g = pipe.generate(&r, &mut |_| {}).unwrap();
    let rep = &g.report;
    let names: Vec<&str> = rep.stages.iter().map(|s| s.0).collect();
    assert_eq!(names, ["tokenize", "clip_l", "clip_g", "transformer_load", "denoise", "vae"]);
    let stage: BTreeMap<&str, f64> =
        names.iter().zip(&rep.stage_device_seconds).map(|(n, d)| (*n, d.unwrap())).collect();
    let steps: Vec<f64> = rep.step_device_seconds.iter().map(|d| d.unwrap()).collect();
    assert_eq!(steps.len(), 2);
    assert_eq!(stage["tokenize"], 0.0, "tokenising runs no device op");
    for name in ["clip_l", "clip_g", "denoise", "vae"] {
        assert!(stage[name] > 0.0, "{name}: {stage:?}");
    }
    assert!(steps.iter().all(|&s| s > 0.0), "{steps:?}");
    assert!(steps.iter().sum::<f64>() <= stage["denoise"] + 1e-9, "{steps:?} vs {stage:?}");
    let total = rep.total_device_seconds.unwrap();
    let stages_but_denoise: f64 = stage.iter().filter(|(n, _)| **n != "denoise").map(|(_, s)| s).sum();
    assert!(total >= stages_but_denoise + stage["denoise"] - 1e-9, "{total} vs {stage:?}");
    let c = clocked.clock.lock().unwrap();
    assert!(c.recorded > 0);
    assert!(c.live.is_empty(), "markers leaked: {:?}", c.live);
}

#[test]
fn benchmark_on_the_cpu_backend_prints_wall_and_device_columns() {
    let dir = scratch("benchmark-columns");
    let out = Command::new(env!("CARGO_BIN_EXE_sd3"))
        .args(["--backend", "cpu", "--prompt", "x", "--steps", "2", "--seed", "1", "--no-t5", "--benchmark", "--out"])
        .arg(PathBuf::from(&dir).join("b.png"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let header = text.lines().find(|l| l.starts_with("stage")).unwrap_or_else(|| panic!("no header:\n{text}"));
    assert_eq!(header.split_whitespace().collect::<Vec<_>>(), ["stage", "wall", "s", "device", "s"], "{text}");
    for label in
        ["tokenize", "clip_l", "clip_g", "transformer_load", "denoise", "vae", "step 0", "step 1", "mean step", "total"]
    {
        let line =
            text.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("{label}:\n{text}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (wall, device) = (cols[cols.len() - 2], cols[cols.len() - 1]);
        assert!(wall.parse::<f64>().is_ok_and(|w| w >= 0.0), "{label}: wall column `{wall}`:\n{text}");
        assert_eq!(device, "-", "{label}: the CPU backend has no device markers:\n{text}");
    }
}
