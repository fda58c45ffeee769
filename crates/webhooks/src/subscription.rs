//! What a subscription is, as pure rules: the events it may ask for, what a
//! registration must hold (each bad field named), the states it moves
//! through, and which secrets sign while one is being rotated.

use std::{collections::BTreeSet, fmt, str::FromStr, time::Duration};

use fluxo_types::{MerchantId, Violations};
use url::Url;

use crate::{DestinationPolicy, Secret};

/// An event a subscription can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    /// An entry was booked (`entry.recorded`).
    EntryRecorded,
    /// A reversal was booked (`entry.reversed`; the reversal's own entry).
    EntryReversed,
    /// A day's consolidated figures changed (`balance.changed`).
    BalanceChanged,
    /// A merchant's books were closed through a date (`period.closed`).
    PeriodClosed,
}

impl EventType {
    /// Every event type, in the API's order.
    pub const ALL: [Self; 4] =
        [Self::EntryRecorded, Self::EntryReversed, Self::BalanceChanged, Self::PeriodClosed];

    /// The name on the wire and in the body's `type`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EntryRecorded => "entry.recorded",
            Self::EntryReversed => "entry.reversed",
            Self::BalanceChanged => "balance.changed",
            Self::PeriodClosed => "period.closed",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Not one of [`EventType::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type (known: entry.recorded, entry.reversed, balance.changed, period.closed)")]
pub struct UnknownEventType;

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|t| t.name() == s).ok_or(UnknownEventType)
    }
}

/// The longest description a subscription keeps.
pub const MAX_DESCRIPTION: usize = 200;

/// A registration, as sent.
#[derive(Debug, Clone, Copy)]
pub struct Registration<'a> {
    /// The merchant whose events are sent.
    pub merchant_id: &'a str,
    /// Where they are sent.
    pub endpoint_url: &'a str,
    /// Which events, by name.
    pub event_types: &'a [String],
    /// Free text for the subscriber's own bookkeeping.
    pub description: &'a str,
}

/// A registration that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Valid {
    /// The merchant.
    pub merchant: MerchantId,
    /// The endpoint, as the destination policy accepted it.
    pub endpoint: Url,
    /// The events, each once.
    pub events: BTreeSet<EventType>,
    /// The description.
    pub description: String,
}

/// Checks `r` under `policy`, naming every field at fault: `merchant_id`,
/// `endpoint_url` (absolute https, no credentials, not an inward address),
/// `event_types` (at least one) or `event_types[i]` (unknown, or twice),
/// `description` (at most [`MAX_DESCRIPTION`] characters).
pub fn validate(r: Registration<'_>, policy: &DestinationPolicy) -> Result<Valid, Violations> {
    let mut v = Violations::default();
    let merchant = v.check("merchant_id", MerchantId::parse(r.merchant_id));
    let endpoint = v.check("endpoint_url", policy.check_url(r.endpoint_url));
    let events = event_types(r.event_types, &mut v);
    if r.description.chars().count() > MAX_DESCRIPTION {
        v.add("description", format!("must be at most {MAX_DESCRIPTION} characters"));
    }
    let description = r.description.to_owned();
    v.finish(|| Some(Valid { merchant: merchant?, endpoint: endpoint?, events, description }))
}

/// The event types of a registration or an update, each once.
pub fn event_types(names: &[String], v: &mut Violations) -> BTreeSet<EventType> {
    if names.is_empty() {
        v.add("event_types", "must name at least one event type");
    }
    let mut events = BTreeSet::new();
    for (i, name) in names.iter().enumerate() {
        let field = format!("event_types[{i}]");
        if let Some(event) = v.check(&field, name.parse::<EventType>())
            && !events.insert(event)
        {
            v.add(field, format!("{event} is listed twice"));
        }
    }
    events
}

/// Where a subscription stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Events are delivered.
    Active,
    /// Paused by its owner: events are kept and delivered on resume.
    Paused,
    /// Disabled by fluxo, for `reason` (an endpoint failing for days, or one
    /// that answered 410 Gone); its owner resumes it once the endpoint is fixed.
    Disabled {
        /// Why, in words for the owner.
        reason: String,
    },
}

/// A change of state an owner asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Stop delivering for now.
    Pause,
    /// Deliver again (also after fluxo disabled it).
    Resume,
}

/// A pause of what is already paused, or a resume of what is active, is no
/// change and not an error: requests are retried, and retrying must be safe.
pub fn apply(state: &State, change: Change) -> State {
    match change {
        Change::Pause => match state {
            // A disabled subscription stays disabled (and says why) until resumed.
            State::Disabled { .. } => state.clone(),
            State::Active | State::Paused => State::Paused,
        },
        Change::Resume => State::Active,
    }
}

/// The secrets of a subscription: the current one, and during a rotation the
/// previous one until its grace period ends.
#[derive(Debug)]
pub struct Secrets {
    /// Signs every delivery.
    pub current: Secret,
    /// Signs too, beside the current one, until `until` (seconds since the epoch).
    pub previous: Option<(Secret, i64)>,
}

impl Secrets {
    /// A new subscription's secrets.
    pub fn new(current: Secret) -> Self {
        Self { current, previous: None }
    }

    /// Rotated at `now` to `next`: the current secret keeps signing for `grace`.
    pub fn rotate(self, next: Secret, now: i64, grace: Duration) -> Self {
        let until = now.saturating_add(i64::try_from(grace.as_secs()).unwrap_or(i64::MAX));
        Self { current: next, previous: Some((self.current, until)) }
    }

    /// What signs a delivery at `now`: the current secret first.
    pub fn signing(&self, now: i64) -> Vec<&Secret> {
        let mut secrets = vec![&self.current];
        if let Some((previous, until)) = &self.previous
            && now < *until
        {
            secrets.push(previous);
        }
        secrets
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Change, EventType, Registration, Secrets, State, apply, validate};
    use crate::{DestinationPolicy, Secret};

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn event_types_round_trip_by_name() {
        for t in EventType::ALL {
            assert_eq!(t.name().parse::<EventType>(), Ok(t));
        }
        assert!("entry.created".parse::<EventType>().is_err());
    }

    #[test]
    fn a_good_registration_passes_and_every_bad_field_is_named() {
        let policy = DestinationPolicy::strict();
        let events = names(&["entry.recorded", "balance.changed"]);
        let ok = validate(
            Registration {
                merchant_id: "m-1",
                endpoint_url: "https://erp.example.com/hooks",
                event_types: &events,
                description: "ERP",
            },
            &policy,
        )
        .unwrap();
        assert_eq!(
            ok.events.into_iter().collect::<Vec<_>>(),
            [EventType::EntryRecorded, EventType::BalanceChanged]
        );

        let bad_events = names(&["entry.recorded", "nope", "entry.recorded"]);
        let long = "d".repeat(201);
        let bad = validate(
            Registration {
                merchant_id: "",
                endpoint_url: "https://10.0.0.7/hooks",
                event_types: &bad_events,
                description: &long,
            },
            &policy,
        )
        .unwrap_err();
        let fields: Vec<&str> = bad.list().iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["merchant_id", "endpoint_url", "event_types[1]", "event_types[2]", "description"]
        );

        let none = validate(
            Registration {
                merchant_id: "m-1",
                endpoint_url: "http://erp.example.com/hooks",
                event_types: &[],
                description: "",
            },
            &policy,
        )
        .unwrap_err();
        let fields: Vec<&str> = none.list().iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["endpoint_url", "event_types"]);
    }

    #[test]
    fn pausing_and_resuming_are_safe_to_repeat_and_a_disabled_one_keeps_its_reason() {
        assert_eq!(apply(&State::Active, Change::Pause), State::Paused);
        assert_eq!(apply(&State::Paused, Change::Pause), State::Paused);
        assert_eq!(apply(&State::Paused, Change::Resume), State::Active);
        assert_eq!(apply(&State::Active, Change::Resume), State::Active);
        let disabled = State::Disabled { reason: "410 Gone".into() };
        assert_eq!(apply(&disabled, Change::Pause), disabled);
        assert_eq!(apply(&disabled, Change::Resume), State::Active);
    }

    #[test]
    fn during_a_rotation_both_secrets_sign_until_the_grace_period_ends() {
        let (old, new) = (Secret::generate().unwrap(), Secret::generate().unwrap());
        let old_text = old.expose_text();
        let secrets = Secrets::new(old).rotate(new, 1_000, Duration::from_secs(3600));
        let at = |now| secrets.signing(now).iter().map(|s| s.expose_text()).collect::<Vec<_>>();
        assert_eq!(at(1_000).len(), 2);
        assert_eq!(at(1_000)[1], old_text);
        assert_eq!(at(4_599).len(), 2);
        assert_eq!(at(4_600).len(), 1);
        assert_ne!(at(4_600)[0], old_text);
    }
}
