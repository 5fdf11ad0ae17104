"""Schemathesis hooks for scripts/fuzz-openapi.sh.

`POST /events` has two rules that JSON Schema cannot state, both documented in the OpenAPI
document's descriptions:

- `enddate` must not precede `startdate`: a comparison of two fields;
- `location.id` must name a location that exists: the script creates one and passes its id
  in CONVEYOR_FUZZ_LOCATION.

Schemathesis generates bodies from the schema alone, so about half of the bodies it calls valid
break the first rule and all those with an id break the second. These hooks make the bodies it
generates as valid follow both, and leave the ones it generates as invalid alone: the server
must still reject those, whatever these rules say.

An event's bookings exist once bookings has learned the event from its message, a moment after
`POST /events` answered (the document says so). After each event created, the hooks wait, as a
client would, until its bookings answer, up to two seconds: a stateful scenario that goes on to
its bookings then tests them, not the race.
"""

import os
import time
import urllib.error
import urllib.request

import schemathesis

KNOWN_LOCATION = os.environ["CONVEYOR_FUZZ_LOCATION"]
BASE_URL = os.environ["CONVEYOR_FUZZ_URL"]
LEARNING_TIME = 2.0


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@schemathesis.hook
def map_case(context, case):
    meta = case.meta
    if case.operation.method.upper() != "POST" or case.operation.path != "/events":
        return case
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return case
    body = case.body
    start, end = body.get("startdate"), body.get("enddate")
    if _is_number(start) and _is_number(end) and end < start:
        body["startdate"], body["enddate"] = end, start
    location = body.get("location")
    # A valid body gives a location either a string id (a known location) or none and its fields.
    if isinstance(location, dict) and isinstance(location.get("id"), str):
        location["id"] = KNOWN_LOCATION
    return case


@schemathesis.hook
def after_call(context, case, response):
    if case.operation.method.upper() != "POST" or case.operation.path != "/events":
        return
    if response.status_code != 201:
        return
    event_id = response.json().get("ID")
    if not isinstance(event_id, str):
        return
    deadline = time.monotonic() + LEARNING_TIME
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{BASE_URL}/events/{event_id}/bookings", timeout=1):
                return
        except urllib.error.HTTPError as error:
            if error.code != 404:
                return
        time.sleep(0.01)
