"""The Responses API's stored responses: bounded, in memory, least recently used out.

A stored response keeps its wire object (GET /v1/responses/{id}) and the conversation it
ended (the chat messages of its input and its own output), which `previous_response_id`
continues.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..chat.request import ChatMessage
from .errors import APIError


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]
    conversation: list[ChatMessage]


class ResponseStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        stored = self._items.get(response_id)
        if stored is None:
            raise APIError(404, f"No response '{response_id}' is stored on this server: it is "
                           "unknown, was created with store=false, or was evicted (the server "
                           f"keeps the last {self.capacity}).", param=param,
                           code="response_not_found")
        self._items.move_to_end(response_id)
        return stored

    def __len__(self) -> int:
        return len(self._items)
