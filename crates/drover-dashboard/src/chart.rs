//! The overview's throughput chart as inline SVG, computed here and drawn by the template:
//! one column per minute, succeeded stacked under failed. No script, no external image.

use drover_ledger::MinuteCount;
use serde::Serialize;

/// Plot area size in SVG units.
pub const WIDTH: f64 = 720.0;
pub const HEIGHT: f64 = 160.0;

/// One minute's column.
#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub x: f64,
    pub width: f64,
    pub ok_y: f64,
    pub ok_h: f64,
    pub fail_y: f64,
    pub fail_h: f64,
    /// The tooltip: `12:34 UTC: 120 succeeded, 3 failed`.
    pub label: String,
}

/// The chart: bars, the y-axis maximum and totals.
#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    pub width: f64,
    pub height: f64,
    pub bars: Vec<Bar>,
    pub max: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub first: String,
    pub last: String,
}

pub fn build(minutes: &[MinuteCount]) -> Chart {
    let max = minutes
        .iter()
        .map(|m| m.succeeded + m.failed)
        .max()
        .unwrap_or(0)
        .max(1);
    let n = minutes.len().max(1) as f64;
    let slot = WIDTH / n;
    let scale = HEIGHT / max as f64;
    let bars = minutes
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let ok_h = m.succeeded as f64 * scale;
            let fail_h = m.failed as f64 * scale;
            Bar {
                x: round(i as f64 * slot + 1.0),
                width: round((slot - 2.0).max(1.0)),
                ok_y: round(HEIGHT - ok_h),
                ok_h: round(ok_h),
                fail_y: round(HEIGHT - ok_h - fail_h),
                fail_h: round(fail_h),
                label: format!(
                    "{} UTC: {} succeeded, {} failed",
                    m.minute.format("%H:%M"),
                    m.succeeded,
                    m.failed
                ),
            }
        })
        .collect();
    let fmt = |m: Option<&MinuteCount>| {
        m.map(|m| m.minute.format("%H:%M").to_string())
            .unwrap_or_default()
    };
    Chart {
        width: WIDTH,
        height: HEIGHT,
        bars,
        max,
        succeeded: minutes.iter().map(|m| m.succeeded).sum(),
        failed: minutes.iter().map(|m| m.failed).sum(),
        first: fmt(minutes.first()),
        last: fmt(minutes.last()),
    }
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    #[test]
    fn bars_scale_to_the_busiest_minute() {
        let t = DateTime::<Utc>::from_timestamp(1_764_000_000, 0).unwrap();
        let minutes = vec![
            MinuteCount {
                minute: t,
                succeeded: 10,
                failed: 0,
            },
            MinuteCount {
                minute: t,
                succeeded: 15,
                failed: 5,
            },
        ];
        let c = build(&minutes);
        assert_eq!(c.max, 20);
        assert_eq!(c.succeeded, 25);
        assert_eq!(c.bars[1].ok_h + c.bars[1].fail_h, HEIGHT);
        assert_eq!(c.bars[0].ok_h, HEIGHT / 2.0);
        assert!(c.bars[1].label.contains("15 succeeded, 5 failed"));
        assert_eq!(build(&[]).max, 1);
    }
}
