//! Events and locations: the rules a new one must satisfy. Pure: no IO, no async.

use std::ops::RangeInclusive;

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_TEXT_CHARS: usize = 500;
pub const MAX_HALLS: usize = 100;
/// Seats one hall may have.
pub const HALL_CAPACITY: RangeInclusive<i64> = 1..=1_000_000;
/// The hours a location may open and close at.
pub const HOURS: RangeInclusive<i64> = 0..=24;

/// A request that breaks a rule, naming the field (a path into the request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

platform::uuid_id!(EventId);
platform::uuid_id!(LocationId);

/// Free text with a length limit; `required` text must not be blank.
fn text(field: &str, value: Option<String>, max: usize, required: bool) -> Result<String, Invalid> {
    let value = value.unwrap_or_default();
    if required && value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(invalid(field, format!("must be at most {max} characters")));
    }
    Ok(value)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hall {
    pub name: String,
    pub location: String,
    pub capacity: i64,
}

/// A hall as requested, before validation.
#[derive(Debug, Clone, Default)]
pub struct HallDraft {
    pub name: Option<String>,
    pub location: Option<String>,
    pub capacity: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub id: LocationId,
    pub name: String,
    pub address: String,
    pub country: String,
    pub open_time: i64,
    pub close_time: i64,
    pub halls: Vec<Hall>,
}

impl Location {
    /// The number of seats an event here can sell.
    pub fn capacity(&self) -> i64 {
        self.halls.iter().map(|hall| hall.capacity).sum()
    }
}

/// A location as requested, before validation.
#[derive(Debug, Clone, Default)]
pub struct LocationDraft {
    pub name: Option<String>,
    pub address: Option<String>,
    pub country: Option<String>,
    pub open_time: Option<i64>,
    pub close_time: Option<i64>,
    pub halls: Option<Vec<HallDraft>>,
}

impl LocationDraft {
    /// Validates the draft; `prefix` is where it sits in the request (`""` or `"location."`).
    pub fn validate(self, prefix: &str) -> Result<Location, Invalid> {
        let field = |name: &str| format!("{prefix}{name}");
        let hour = |name: &str, value: Option<i64>| match value {
            None => Ok(0),
            Some(hour) if HOURS.contains(&hour) => Ok(hour),
            Some(_) => Err(invalid(
                field(name),
                format!("must be an hour from {} to {}", HOURS.start(), HOURS.end()),
            )),
        };
        let drafts = self.halls.unwrap_or_default();
        if drafts.is_empty() {
            return Err(invalid(field("halls"), "at least one hall is required"));
        }
        if drafts.len() > MAX_HALLS {
            return Err(invalid(
                field("halls"),
                format!("at most {MAX_HALLS} halls"),
            ));
        }
        let halls = drafts
            .into_iter()
            .enumerate()
            .map(|(i, hall)| {
                let at = |name: &str| field(&format!("halls[{i}].{name}"));
                let capacity = match hall.capacity {
                    Some(capacity) if HALL_CAPACITY.contains(&capacity) => capacity,
                    _ => {
                        let (min, max) = (HALL_CAPACITY.start(), HALL_CAPACITY.end());
                        return Err(invalid(
                            at("capacity"),
                            format!("must be from {min} to {max}"),
                        ));
                    }
                };
                Ok(Hall {
                    name: text(&at("name"), hall.name, MAX_NAME_CHARS, false)?,
                    location: text(&at("location"), hall.location, MAX_TEXT_CHARS, false)?,
                    capacity,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Location {
            id: LocationId::new(),
            name: text(&field("name"), self.name, MAX_NAME_CHARS, true)?,
            address: text(&field("address"), self.address, MAX_TEXT_CHARS, false)?,
            country: text(&field("country"), self.country, MAX_NAME_CHARS, false)?,
            open_time: hour("opentime", self.open_time)?,
            close_time: hour("closetime", self.close_time)?,
            halls,
        })
    }
}

/// Where a new event takes place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Venue {
    Known(LocationId),
    New(Location),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: EventId,
    pub name: String,
    /// Opaque integers, stored and echoed as given (the original's clients read Unix seconds).
    pub start_date: i64,
    pub end_date: i64,
    pub duration: i64,
    pub location: Location,
}

/// An event ready to be created, its venue still to be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: EventId,
    pub name: String,
    pub start_date: i64,
    pub end_date: i64,
    pub duration: i64,
    pub venue: Venue,
}

/// An event as requested, before validation.
#[derive(Debug, Clone, Default)]
pub struct EventDraft {
    pub name: Option<String>,
    pub start_date: Option<i64>,
    pub end_date: Option<i64>,
    pub duration: Option<i64>,
    /// A known location to reuse; when given, the rest of `location` is ignored.
    pub location_id: Option<String>,
    pub location: Option<LocationDraft>,
}

impl EventDraft {
    pub fn validate(self) -> Result<NewEvent, Invalid> {
        let name = text("name", self.name, MAX_NAME_CHARS, true)?;
        let start_date = self
            .start_date
            .ok_or_else(|| invalid("startdate", "is required"))?;
        let end_date = self
            .end_date
            .ok_or_else(|| invalid("enddate", "is required"))?;
        if end_date < start_date {
            return Err(invalid("enddate", "must not be before startdate"));
        }
        let duration = match self.duration {
            Some(duration) if duration > 0 => duration,
            _ => return Err(invalid("duration", "must be greater than 0")),
        };
        let venue = match (self.location_id, self.location) {
            (Some(id), _) => Venue::Known(
                LocationId::parse(&id)
                    .ok_or_else(|| invalid("location.id", "is not a location id"))?,
            ),
            (None, Some(location)) => Venue::New(location.validate("location.")?),
            (None, None) => return Err(invalid("location", "is required")),
        };
        Ok(NewEvent {
            id: EventId::new(),
            name,
            start_date,
            end_date,
            duration,
            venue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hall(capacity: i64) -> HallDraft {
        HallDraft {
            name: Some("lobby".into()),
            location: Some("principal building".into()),
            capacity: Some(capacity),
        }
    }

    fn location() -> LocationDraft {
        LocationDraft {
            name: Some("Paris fifa park".into()),
            address: Some("le monses".into()),
            country: Some("frn".into()),
            open_time: Some(10),
            close_time: Some(15),
            halls: Some(vec![hall(150), hall(50)]),
        }
    }

    fn event() -> EventDraft {
        EventDraft {
            name: Some("best".into()),
            start_date: Some(768346784368),
            end_date: Some(768346784368),
            duration: Some(120),
            location_id: None,
            location: Some(location()),
        }
    }

    fn field_of(draft: EventDraft) -> String {
        draft.validate().expect_err("should be invalid").field
    }

    #[test]
    fn the_seed_event_is_valid_and_its_capacity_sums_the_halls() {
        let new = event().validate().expect("valid");
        assert_eq!(new.name, "best");
        match new.venue {
            Venue::New(location) => assert_eq!(location.capacity(), 200),
            Venue::Known(_) => panic!("expected a new location"),
        }
    }

    #[test]
    fn name_must_be_present_and_at_most_200_chars() {
        assert_eq!(
            field_of(EventDraft {
                name: None,
                ..event()
            }),
            "name"
        );
        assert_eq!(
            field_of(EventDraft {
                name: Some("  ".into()),
                ..event()
            }),
            "name"
        );
        assert_eq!(
            field_of(EventDraft {
                name: Some("x".repeat(201)),
                ..event()
            }),
            "name"
        );
        assert!(EventDraft {
            name: Some("é".repeat(200)),
            ..event()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn end_must_not_precede_start() {
        let draft = EventDraft {
            end_date: Some(1),
            start_date: Some(2),
            ..event()
        };
        assert_eq!(field_of(draft), "enddate");
        assert_eq!(
            field_of(EventDraft {
                start_date: None,
                ..event()
            }),
            "startdate"
        );
    }

    #[test]
    fn duration_must_be_positive() {
        assert_eq!(
            field_of(EventDraft {
                duration: Some(0),
                ..event()
            }),
            "duration"
        );
        assert_eq!(
            field_of(EventDraft {
                duration: None,
                ..event()
            }),
            "duration"
        );
    }

    #[test]
    fn hours_must_be_within_a_day() {
        for (open, close, field) in [
            (Some(25), Some(3), "location.opentime"),
            (Some(1), Some(-1), "location.closetime"),
        ] {
            let location = LocationDraft {
                open_time: open,
                close_time: close,
                ..location()
            };
            assert_eq!(
                field_of(EventDraft {
                    location: Some(location),
                    ..event()
                }),
                field
            );
        }
        let location = LocationDraft {
            open_time: Some(0),
            close_time: Some(24),
            ..location()
        };
        assert!(EventDraft {
            location: Some(location),
            ..event()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn a_location_needs_halls_with_seats() {
        let no_halls = LocationDraft {
            halls: Some(vec![]),
            ..location()
        };
        assert_eq!(
            field_of(EventDraft {
                location: Some(no_halls),
                ..event()
            }),
            "location.halls"
        );
        let empty_hall = LocationDraft {
            halls: Some(vec![hall(10), hall(0)]),
            ..location()
        };
        assert_eq!(
            field_of(EventDraft {
                location: Some(empty_hall),
                ..event()
            }),
            "location.halls[1].capacity"
        );
        assert_eq!(
            field_of(EventDraft {
                location: None,
                ..event()
            }),
            "location"
        );
    }

    #[test]
    fn a_known_location_is_referenced_by_id() {
        let id = LocationId::new();
        let draft = EventDraft {
            location_id: Some(id.to_string()),
            location: None,
            ..event()
        };
        assert_eq!(draft.validate().expect("valid").venue, Venue::Known(id));
        let bad = EventDraft {
            location_id: Some("nope".into()),
            ..event()
        };
        assert_eq!(field_of(bad), "location.id");
    }
}
