//! Loss curves as PNG (plotters): `OUT/loss.png` of a run and `compare` over several runs.

use crate::finetune::Metric;
use anyhow::Context;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Embedded so plots have labels on machines without fonts (see `assets/README.md`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// One line of a plot: a label and `(step, loss)` points.
#[derive(Debug, Clone)]
pub struct Curve {
    /// Legend text.
    pub label: String,
    /// `(step, loss)` in step order.
    pub points: Vec<(f64, f64)>,
}

/// Read `metrics.jsonl` (lines that do not parse are skipped).
pub fn read_metrics(path: &Path) -> anyhow::Result<Vec<Metric>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The train and validation curves of a run's metrics, labelled `{name} train` / `{name} val`.
pub fn run_curves(metrics: &[Metric], name: &str) -> Vec<Curve> {
    ["train", "val"]
        .iter()
        .map(|split| Curve {
            label: if name.is_empty() {
                split.to_string()
            } else {
                format!("{name} {split}")
            },
            points: metrics
                .iter()
                .filter(|m| m.split == *split && m.loss.is_finite())
                .map(|m| (m.step as f64, m.loss))
                .collect(),
        })
        .filter(|c| !c.points.is_empty())
        .collect()
}

/// Draw `curves` (loss against step) to the PNG `path`, written atomically.
pub fn loss_png(path: &Path, title: &str, curves: &[Curve]) -> anyhow::Result<()> {
    anyhow::ensure!(
        curves.iter().any(|c| !c.points.is_empty()),
        "{}: no loss values to plot",
        path.display()
    );
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let all = curves.iter().flat_map(|c| &c.points);
    let (x_max, mut y_min, mut y_max) = all.fold((1.0f64, f64::MAX, f64::MIN), |(x, lo, hi), p| {
        (x.max(p.0), lo.min(p.1), hi.max(p.1))
    });
    if y_max - y_min < 1e-6 {
        (y_min, y_max) = (y_min - 0.5, y_max + 0.5);
    }
    let pad = 0.05 * (y_max - y_min);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let tmp: PathBuf = dir.join(format!(".plot.tmp{}.png", std::process::id()));
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(&tmp, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, c) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(c.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
        Ok(())
    };
    let result = draw().map_err(|e| anyhow::anyhow!("{}: cannot draw: {e}", path.display()));
    let result = result.and_then(|_| {
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `compare`: the curves of several run folders (their `metrics.jsonl`) on one plot.
pub fn compare(runs: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(!runs.is_empty(), "--runs: give at least one run folder");
    let mut curves = vec![];
    for r in runs {
        let metrics = read_metrics(&r.join("metrics.jsonl"))?;
        anyhow::ensure!(
            !metrics.is_empty(),
            "{}: no metrics",
            r.join("metrics.jsonl").display()
        );
        let name = r
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| r.display().to_string());
        curves.extend(run_curves(&metrics, &name));
    }
    loss_png(out, "loss", &curves)
}
