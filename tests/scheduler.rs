//! The flow-match Euler schedule against the values in the reference (§3) and the diffusers goldens.

use sd3::scheduler::{FlowMatchEulerDiscreteScheduler as Sched, SchedulerConfig};
use sd3::weights::Weights;
use std::path::PathBuf;

fn cfg(shift: f64) -> SchedulerConfig {
    SchedulerConfig { shift, ..SchedulerConfig::default() }
}

#[test]
fn sd3_shift3_28_steps() {
    let want: [f64; 28] = [
        1000.0, 987.3806, 974.1077, 960.1293, 945.3875, 929.8179, 913.3490, 895.9003, 877.3819, 857.6923, 836.7167,
        814.3248, 790.3683, 764.6771, 737.0558, 707.2785, 675.0823, 640.1602, 602.1506, 560.625, 515.0721, 464.8760,
        409.2888, 347.3926, 278.0488, 199.8270, 110.9057, 8.928572,
    ];
    let s = Sched::new(cfg(3.0), 28).unwrap();
    assert_eq!(s.timesteps.len(), 28);
    for (got, want) in s.timesteps.iter().zip(want) {
        assert!((*got as f64 - want).abs() < 1e-3, "{got} vs {want}");
    }
    assert_eq!(s.sigmas.len(), 29);
    assert_eq!(s.sigmas[27] as f64, 0.008928571827709675); // shift(shift(0.001)), as an f32
    assert_eq!(s.sigmas[28], 0.0);
}

#[test]
fn two_steps_with_shift_3_and_1() {
    let s = Sched::new(cfg(3.0), 2).unwrap();
    assert_eq!(s.timesteps, [1000.0, 8.928572]);
    assert_eq!(s.sigmas, [1.0, s.sigmas[1], 0.0]);
    assert_eq!(s.sigmas[1] as f64, 0.008928571827709675);
    let s = Sched::new(cfg(1.0), 2).unwrap();
    assert_eq!(s.timesteps, [1000.0, 1.0]);
    assert_eq!(s.sigmas, [1.0, 0.001, 0.0]);
}

#[test]
fn equals_the_diffusers_goldens_bit_for_bit() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let sched_cfg = SchedulerConfig::load(&root.join("sd3-tiny/scheduler")).unwrap();
    assert_eq!(sched_cfg.shift, 3.0);
    for case in ["sd3-cfg", "sd3-nocfg", "sd3-long-prompt", "sd3-lora", "sd35-cfg", "sd35-slg"] {
        let g = Weights::open_file(&root.join(format!("golden/{case}/golden.safetensors"))).unwrap();
        let timesteps = g.host_f32("timesteps").unwrap();
        let s = Sched::new(sched_cfg.clone(), timesteps.len()).unwrap();
        assert_eq!(s.timesteps, timesteps, "{case}");
        assert_eq!(s.sigmas, g.host_f32("sigmas").unwrap(), "{case}");
    }
}

#[test]
fn unsupported_options_and_zero_steps_are_errors() {
    let dir = std::env::temp_dir().join(format!("sd3-test-{}-sched", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("scheduler_config.json"), r#"{"shift": 3.0, "use_dynamic_shifting": true}"#).unwrap();
    let e = SchedulerConfig::load(&dir).unwrap_err().to_string();
    assert!(e.contains("use_dynamic_shifting") && e.contains("not supported"), "{e}");
    let e = SchedulerConfig::load(&dir.join("nope")).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
    assert!(Sched::new(cfg(3.0), 0).is_err());
}
