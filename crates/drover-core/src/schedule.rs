//! Schedules: when a schedule's slots fall, which of the due ones fire (the catch-up
//! policy), and the idempotency key of each slot's job.
//!
//! A slot is an instant in UTC. A cron schedule's slots are the instants its expression
//! matches (five fields, or six with seconds first); an `--every` schedule's slots are the
//! multiples of its period since the Unix epoch (`--every 1h` fires on the hour, `--every
//! 1d` at midnight UTC), so they do not depend on when the schedule was added.

use chrono::{DateTime, SecondsFormat, Utc};
use std::fmt;
use std::str::FromStr;

/// How overdue a slot may be and still count as on time for `--catch-up none`: workers fire
/// a due slot within about a second, so anything later was missed while no worker ran.
pub const ON_TIME_SECS: i64 = 60;

/// Most slots one schedule fires in one sweep with `--catch-up all` (the next sweep goes
/// on where this one stopped).
pub const MAX_SLOTS_PER_SWEEP: usize = 1000;

/// A schedule definition that cannot be used, naming the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?}: {reason}")]
pub struct ScheduleError {
    /// The flag or column, e.g. `--cron`.
    pub field: &'static str,
    /// The value as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> ScheduleError {
    ScheduleError {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// When a schedule's slots fall.
#[derive(Debug, Clone)]
pub enum Spec {
    /// A cron expression, evaluated in UTC.
    Cron {
        /// The expression as given.
        expr: String,
        /// The parsed expression.
        schedule: Box<cron::Schedule>,
    },
    /// A fixed period in whole seconds, slots aligned on the Unix epoch.
    Every {
        /// The period in seconds (at least 1).
        secs: i64,
    },
}

impl Spec {
    /// Parses a cron expression (UTC) with the `cron` crate: five fields (minute hour
    /// day-of-month month day-of-week, as in crontab), six with seconds first, seven with a
    /// year last, or a shorthand (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`).
    /// Days of the week must be named (`MON-FRI`): numbered days mean different days in
    /// different cron dialects (Sunday is 0 or 7 in crontab, 1 in the `cron` crate), so a
    /// number there is refused rather than guessed.
    pub fn cron(expr: &str) -> Result<Spec, ScheduleError> {
        let text = expr.split_whitespace().collect::<Vec<_>>().join(" ");
        let fields: Vec<&str> = text.split(' ').collect();
        let full = match fields.len() {
            1 if text.starts_with('@') => text.clone(),
            5 => format!("0 {text}"),
            6 | 7 => text.clone(),
            n => {
                return Err(invalid(
                    "--cron",
                    expr,
                    format!(
                        "{n} fields; expected 5 (minute hour day-of-month month day-of-week),                          6 (seconds first) or 7 (a year last), or a shorthand such as @daily"
                    ),
                ));
            }
        };
        if !text.starts_with('@') {
            let dow = fields[if fields.len() == 5 { 4 } else { 5 }];
            if dow.chars().any(|c| c.is_ascii_digit()) {
                return Err(invalid(
                    "--cron",
                    expr,
                    format!(
                        "day-of-week field {dow:?}: name the days (MON, TUE-FRI, SAT,SUN);                          numbered days differ between cron dialects"
                    ),
                ));
            }
        }
        let schedule = cron::Schedule::from_str(&full)
            .map_err(|e| invalid("--cron", expr, format!("not a cron expression ({e})")))?;
        let spec = Spec::Cron {
            expr: text,
            schedule: Box::new(schedule),
        };
        // An expression that never matches (e.g. 30 February) is refused here rather than
        // by every sweep.
        spec.next_after(Utc::now())
            .map_err(|e| invalid("--cron", expr, e.reason))?;
        Ok(spec)
    }

    /// Parses a period such as `90s`, `10m`, `1h` or `1d`: whole seconds, at least one.
    pub fn every(text: &str) -> Result<Spec, ScheduleError> {
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            invalid(
                "--every",
                text,
                format!("expected a duration such as 30s, 10m, 1h or 1d ({e})"),
            )
        })?;
        if d.subsec_nanos() != 0 || d.as_secs() == 0 {
            return Err(invalid(
                "--every",
                text,
                "the period must be a whole number of seconds, at least 1s",
            ));
        }
        let secs = i64::try_from(d.as_secs())
            .ok()
            .filter(|s| *s <= 366 * 86_400)
            .ok_or_else(|| invalid("--every", text, "the period must be at most 366 days"))?;
        Ok(Spec::Every { secs })
    }

    /// The spec stored in the ledger (exactly one of the two columns is set).
    pub fn stored(cron: Option<&str>, every_secs: Option<i64>) -> Result<Spec, ScheduleError> {
        match (cron, every_secs) {
            (Some(expr), None) => Spec::cron(expr),
            (None, Some(secs)) if secs > 0 => Ok(Spec::Every { secs }),
            (c, e) => Err(invalid(
                "schedule",
                &format!("cron={c:?} every_secs={e:?}"),
                "a schedule has either a cron expression or a period",
            )),
        }
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Result<DateTime<Utc>, ScheduleError> {
        match self {
            Spec::Cron { expr, schedule } => schedule
                .after(&t)
                .next()
                .ok_or_else(|| invalid("--cron", expr, format!("has no slot after {t}"))),
            Spec::Every { secs } => {
                let now = t.timestamp();
                let next = (now.div_euclid(*secs) + 1) * secs;
                DateTime::from_timestamp(next, 0)
                    .ok_or_else(|| invalid("--every", &secs.to_string(), "slot out of range"))
            }
        }
    }

    /// The cron expression, if this is a cron schedule.
    pub fn cron_expr(&self) -> Option<&str> {
        match self {
            Spec::Cron { expr, .. } => Some(expr),
            Spec::Every { .. } => None,
        }
    }

    /// The period in seconds, if this is an `--every` schedule.
    pub fn every_secs(&self) -> Option<i64> {
        match self {
            Spec::Every { secs } => Some(*secs),
            Spec::Cron { .. } => None,
        }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Cron { expr, .. } => write!(f, "cron {expr}"),
            Spec::Every { secs } => write!(
                f,
                "every {}",
                humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs()))
            ),
        }
    }
}

/// What to do with the slots missed while no worker ran (`--catch-up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Skip them: only a slot at most [`ON_TIME_SECS`] overdue fires.
    None,
    /// Fire the most recent one only (the default).
    #[default]
    Latest,
    /// Fire every one, oldest first.
    All,
}

impl CatchUp {
    /// The spelling on the command line and in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::None => "none",
            CatchUp::Latest => "latest",
            CatchUp::All => "all",
        }
    }
}

impl FromStr for CatchUp {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(CatchUp::None),
            "latest" => Ok(CatchUp::Latest),
            "all" => Ok(CatchUp::All),
            other => Err(invalid("--catch-up", other, "expected none, latest or all")),
        }
    }
}

impl fmt::Display for CatchUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The due slots of one sweep: which fire, and the schedule's next slot afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueSlots {
    /// Slots to fire, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Due slots skipped by the catch-up policy.
    pub skipped: u64,
    /// The slot to wait for next.
    pub next: DateTime<Utc>,
}

/// The slots from `next_slot` up to `now` and which of them fire under `catch_up`.
pub fn due_slots(
    spec: &Spec,
    next_slot: DateTime<Utc>,
    now: DateTime<Utc>,
    catch_up: CatchUp,
) -> Result<DueSlots, ScheduleError> {
    let mut due = Vec::new();
    let mut skipped = 0u64;
    let mut slot = next_slot;
    while slot <= now {
        if catch_up == CatchUp::All && due.len() == MAX_SLOTS_PER_SWEEP {
            // The rest fire in the next sweep.
            return Ok(DueSlots {
                fire: due,
                skipped,
                next: slot,
            });
        }
        if catch_up != CatchUp::All && !due.is_empty() {
            // Only the most recent due slot can fire: count the one it replaces.
            due.clear();
            skipped += 1;
        }
        due.push(slot);
        slot = spec.next_after(slot)?;
    }
    if catch_up == CatchUp::None
        && let Some(last) = due.last()
        && (now - *last).num_seconds() > ON_TIME_SECS
    {
        due.clear();
        skipped += 1;
    }
    Ok(DueSlots {
        fire: due,
        skipped,
        next: slot,
    })
}

/// The idempotency-key template of a schedule: text with the placeholders `{name}`,
/// `{slot}` (the slot's RFC 3339 time, e.g. `2026-12-01T06:00:00Z`) and `{date}` (its
/// date, e.g. `2026-12-01`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate(String);

const PLACEHOLDERS: [&str; 3] = ["name", "slot", "date"];

impl KeyTemplate {
    /// Checks the placeholders: only `{name}`, `{slot}` and `{date}`, braces balanced, and
    /// `{slot}` or `{date}` present (a key that does not change with the slot would fire
    /// once ever). Whether `{date}` alone is enough depends on the spec: see
    /// [`check_distinct`](Self::check_distinct).
    pub fn parse(text: &str) -> Result<KeyTemplate, ScheduleError> {
        let mut rest = text;
        let mut seen = Vec::new();
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(invalid("--key-template", text, "unmatched '}'"));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| invalid("--key-template", text, "unmatched '{'"))?;
            let name = &after[..close];
            if !PLACEHOLDERS.contains(&name) {
                return Err(invalid(
                    "--key-template",
                    text,
                    format!("unknown placeholder {{{name}}}; use {{name}}, {{slot}} or {{date}}"),
                ));
            }
            seen.push(name.to_string());
            rest = &after[close + 1..];
        }
        if !seen.iter().any(|p| p == "slot" || p == "date") {
            return Err(invalid(
                "--key-template",
                text,
                "must contain {slot} (or {date}), so each slot's job has its own key",
            ));
        }
        Ok(KeyTemplate(text.to_string()))
    }

    /// The template as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of schedule `name`'s job for `slot`.
    pub fn render(&self, name: &str, slot: DateTime<Utc>) -> String {
        self.0
            .replace("{name}", name)
            .replace("{slot}", &slot.to_rfc3339_opts(SecondsFormat::Secs, true))
            .replace("{date}", &slot.format("%Y-%m-%d").to_string())
    }

    /// Refuses a template under which two of the next slots after `from` would share a
    /// key (e.g. `{date}` alone for a schedule that fires more than once a day), and a key
    /// the message contract would refuse (over 256 bytes, control characters).
    pub fn check_distinct(
        &self,
        name: &str,
        spec: &Spec,
        from: DateTime<Utc>,
    ) -> Result<(), ScheduleError> {
        let mut slot = spec.next_after(from)?;
        let mut prev = self.render(name, slot);
        check_key(self.as_str(), &prev)?;
        for _ in 0..48 {
            slot = spec.next_after(slot)?;
            let key = self.render(name, slot);
            if key == prev {
                return Err(invalid(
                    "--key-template",
                    self.as_str(),
                    format!(
                        "two slots get the same key {key:?} ({spec} fires more than once a \
                         day); use {{slot}}"
                    ),
                ));
            }
            prev = key;
        }
        Ok(())
    }
}

fn check_key(template: &str, key: &str) -> Result<(), ScheduleError> {
    if key.len() > 256 {
        return Err(invalid(
            "--key-template",
            template,
            format!("renders {} bytes, keys are at most 256", key.len()),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid(
            "--key-template",
            template,
            "keys must not contain control characters",
        ));
    }
    Ok(())
}

/// A schedule name: 1-64 of `[A-Za-z0-9_.-]`.
pub fn check_name(name: &str) -> Result<(), ScheduleError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid("NAME", name, "expected 1-64 of [A-Za-z0-9_.-]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().expect("rfc3339")
    }

    #[test]
    fn every_slots_are_aligned_on_the_epoch() {
        let s = Spec::every("1h").expect("1h");
        assert_eq!(
            s.next_after(t("2026-12-01T05:59:59Z")).expect("next"),
            t("2026-12-01T06:00:00Z")
        );
        assert_eq!(
            s.next_after(t("2026-12-01T06:00:00Z")).expect("next"),
            t("2026-12-01T07:00:00Z")
        );
        assert!(Spec::every("0s").is_err());
        assert!(Spec::every("1500ms").is_err());
        let e = Spec::every("soon").expect_err("not a duration");
        assert!(e.to_string().contains("--every \"soon\""), "{e}");
    }

    #[test]
    fn cron_is_parsed_and_evaluated_in_utc() {
        let s = Spec::cron("0 6 1 * *").expect("monthly");
        assert_eq!(
            s.next_after(t("2026-12-03T00:00:00Z")).expect("next"),
            t("2027-01-01T06:00:00Z")
        );
        let s = Spec::cron("*/2 * * * * *").expect("seconds");
        assert_eq!(
            s.next_after(t("2026-12-03T00:00:01Z")).expect("next"),
            t("2026-12-03T00:00:02Z")
        );
        let s = Spec::cron("30 9 * * MON-FRI").expect("weekdays");
        assert_eq!(
            s.next_after(t("2026-12-05T00:00:00Z")).expect("next"),
            t("2026-12-07T09:30:00Z"),
            "Saturday 5 December: next is Monday"
        );
        assert!(Spec::cron("@daily").is_ok());
        let e = Spec::cron("61 * * * *").expect_err("bad minute");
        assert!(e.to_string().starts_with("--cron \"61 * * * *\""), "{e}");
        let e = Spec::cron("0 6 * * 1").expect_err("numbered day");
        assert!(e.to_string().contains("name the days"), "{e}");
        assert!(Spec::cron("0 6 *").is_err());
        assert!(
            Spec::cron("0 0 30 FEB *").is_err(),
            "30 February never comes"
        );
    }

    #[test]
    fn catch_up_policies() {
        let s = Spec::every("1m").expect("1m");
        let next = t("2026-12-03T10:00:00Z");
        let now = t("2026-12-03T10:05:30Z");
        let all = due_slots(&s, next, now, CatchUp::All).expect("all");
        assert_eq!(all.fire.len(), 6);
        assert_eq!(all.next, t("2026-12-03T10:06:00Z"));
        let latest = due_slots(&s, next, now, CatchUp::Latest).expect("latest");
        assert_eq!(latest.fire, vec![t("2026-12-03T10:05:00Z")]);
        assert_eq!(latest.skipped, 5);
        let none = due_slots(&s, next, now, CatchUp::None).expect("none");
        assert_eq!(
            none.fire,
            vec![t("2026-12-03T10:05:00Z")],
            "30 s late is on time"
        );
        let five = Spec::every("5m").expect("5m");
        let late = due_slots(&five, next, t("2026-12-03T10:07:00Z"), CatchUp::None).expect("none");
        assert!(late.fire.is_empty(), "10:05 is two minutes late: missed");
        assert_eq!(late.skipped, 2);
        assert_eq!(late.next, t("2026-12-03T10:10:00Z"));
        let early = due_slots(&s, next, t("2026-12-03T09:59:59Z"), CatchUp::All).expect("early");
        assert!(early.fire.is_empty());
        assert_eq!(early.next, next);
    }

    #[test]
    fn key_templates() {
        let k = KeyTemplate::parse("acme:{name}:{slot}").expect("template");
        assert_eq!(
            k.render("payroll", t("2026-12-01T06:00:00Z")),
            "acme:payroll:2026-12-01T06:00:00Z"
        );
        let d = KeyTemplate::parse("acme:{date}").expect("template");
        assert_eq!(d.render("x", t("2026-12-01T06:00:00Z")), "acme:2026-12-01");
        assert!(
            d.check_distinct("x", &Spec::every("1d").expect("1d"), Utc::now())
                .is_ok()
        );
        let e = d
            .check_distinct("x", &Spec::every("1h").expect("1h"), Utc::now())
            .expect_err("hourly by date");
        assert!(e.to_string().contains("same key"), "{e}");
        assert!(KeyTemplate::parse("acme:{name}").is_err());
        assert!(KeyTemplate::parse("acme:{slt}").is_err());
        assert!(KeyTemplate::parse("acme:{slot").is_err());
        assert!(KeyTemplate::parse("acme:slot}").is_err());
        assert!("sometimes".parse::<CatchUp>().is_err());
        assert!(check_name("payroll-monthly").is_ok());
        assert!(check_name("a b").is_err());
    }
}
