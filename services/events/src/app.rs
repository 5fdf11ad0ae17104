//! The events service's use cases.

use crate::domain::{
    Event, EventDraft, EventId, Invalid, Location, LocationDraft, LocationId, NewEvent, Venue,
};
use crate::store;
use events_api::{EventCreated, Hall as HallMessage, LocationCreated};
use platform::{Database, StoreError};

/// Most items one page of a list returns.
pub const MAX_PAGE: i64 = 1000;
/// Items a page returns when the request does not say.
pub const DEFAULT_PAGE: i64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no event {0}")]
    EventNotFound(String),
    #[error("no location {0}")]
    LocationNotFound(String),
    #[error("location {0} does not exist")]
    UnknownLocation(LocationId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<platform::sql::Error> for EventsError {
    fn from(error: platform::sql::Error) -> Self {
        EventsError::Store(error.into())
    }
}

/// A window on a list, newest first.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}

impl Page {
    pub fn new(limit: Option<i64>, offset: Option<i64>) -> Result<Page, Invalid> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Invalid {
                field: "limit".into(),
                message: format!("must be from 1 to {MAX_PAGE}"),
            });
        }
        let offset = offset.unwrap_or(0);
        if offset < 0 {
            return Err(Invalid {
                field: "offset".into(),
                message: "must not be negative".into(),
            });
        }
        Ok(Page { limit, offset })
    }
}

#[derive(Clone)]
pub struct Events {
    db: Database,
}

impl Events {
    pub fn new(db: Database) -> Self {
        Events { db }
    }

    /// Creates the event (and its location, unless it reuses a known one) and publishes
    /// `EventCreated` (and `LocationCreated`) in the same unit of work.
    pub async fn create_event(&self, draft: EventDraft) -> Result<Event, EventsError> {
        let new = draft.validate()?;
        self.db
            .write(move |uow| {
                let NewEvent {
                    id,
                    name,
                    start_date,
                    end_date,
                    duration,
                    venue,
                } = new.clone();
                let location = match venue {
                    Venue::Known(id) => {
                        store::location(uow.conn(), id)?.ok_or(EventsError::UnknownLocation(id))?
                    }
                    Venue::New(location) => {
                        store::insert_location(uow, &location)?;
                        uow.emit(&location_created(&location))?;
                        location
                    }
                };
                let event = Event {
                    id,
                    name,
                    start_date,
                    end_date,
                    duration,
                    location,
                };
                store::insert_event(uow, &event)?;
                uow.emit(&event_created(&event))?;
                Ok(event)
            })
            .await
    }

    pub async fn create_location(&self, draft: LocationDraft) -> Result<Location, EventsError> {
        let location = draft.validate("")?;
        self.db
            .write(move |uow| {
                store::insert_location(uow, &location)?;
                uow.emit(&location_created(&location))?;
                Ok(location.clone())
            })
            .await
    }

    pub async fn event(&self, id: EventId) -> Result<Event, EventsError> {
        self.db
            .read(move |conn| Ok::<_, EventsError>(store::event(conn, id)?))
            .await?
            .ok_or_else(|| EventsError::EventNotFound(id.to_string()))
    }

    pub async fn event_by_name(&self, name: &str) -> Result<Event, EventsError> {
        let owned = name.to_owned();
        self.db
            .read(move |conn| Ok::<_, EventsError>(store::event_by_name(conn, &owned)?))
            .await?
            .ok_or_else(|| EventsError::EventNotFound(name.to_owned()))
    }

    pub async fn events(&self, page: Page) -> Result<Vec<Event>, EventsError> {
        self.db
            .read(move |conn| Ok(store::events(conn, page.limit, page.offset)?))
            .await
    }

    pub async fn location(&self, id: &str) -> Result<Location, EventsError> {
        let not_found = || EventsError::LocationNotFound(id.to_owned());
        let id = LocationId::parse(id).ok_or_else(not_found)?;
        self.db
            .read(move |conn| Ok::<_, EventsError>(store::location(conn, id)?))
            .await?
            .ok_or_else(not_found)
    }

    pub async fn locations(&self, page: Page) -> Result<Vec<Location>, EventsError> {
        self.db
            .read(move |conn| Ok(store::locations(conn, page.limit, page.offset)?))
            .await
    }
}

fn event_created(event: &Event) -> EventCreated {
    EventCreated {
        id: event.id.to_string(),
        name: event.name.clone(),
        startdate: event.start_date,
        enddate: event.end_date,
        duration: event.duration,
        location_id: event.location.id.to_string(),
        capacity: event.location.capacity(),
    }
}

fn location_created(location: &Location) -> LocationCreated {
    LocationCreated {
        id: location.id.to_string(),
        name: location.name.clone(),
        address: location.address.clone(),
        country: location.country.clone(),
        halls: location
            .halls
            .iter()
            .map(|hall| HallMessage {
                name: hall.name.clone(),
                location: hall.location.clone(),
                capacity: hall.capacity,
            })
            .collect(),
    }
}
