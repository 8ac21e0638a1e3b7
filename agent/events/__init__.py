from agent.events.bus import EventBus, JsonLinesSink
from agent.events.model import Destination, Event, EventKind, ProcessInfo

__all__ = ["Destination", "Event", "EventBus", "EventKind", "JsonLinesSink", "ProcessInfo"]
