"""An incremental JSON validator: characters in, "still a valid prefix?" and "complete?" out.

Tool-call arguments are streamed to the client while the model writes them, so the parsers
need to know, character by character, whether the text so far can still become one JSON
value and where that value ends (a `}` may close the arguments or the object around them).
This is a small pushdown automaton over RFC 8259; it never builds the value.
"""

from __future__ import annotations

_WHITESPACE = " \t\n\r"
_ESCAPES = '"\\/bfnrtu'
_HEX = "0123456789abcdefABCDEF"
_DIGITS = "0123456789"
# Number automaton: state -> {character class -> next state}; accepting states below.
_NUMBER = {
    "start": {"-": "minus", "0": "zero", "1-9": "int"},
    "minus": {"0": "zero", "1-9": "int"},
    "zero": {".": "dot", "e": "exp_mark"},
    "int": {"0": "int", "1-9": "int", ".": "dot", "e": "exp_mark"},
    "dot": {"0": "frac", "1-9": "frac"},
    "frac": {"0": "frac", "1-9": "frac", "e": "exp_mark"},
    "exp_mark": {"+": "exp_sign", "-": "exp_sign", "0": "exp", "1-9": "exp"},
    "exp_sign": {"0": "exp", "1-9": "exp"},
    "exp": {"0": "exp", "1-9": "exp"},
}
_NUMBER_DONE = {"zero", "int", "frac", "exp"}
_LITERALS = {"t": "true", "f": "false", "n": "null"}


def _number_class(ch: str) -> str:
    if ch in "123456789":
        return "1-9"
    return "e" if ch in "eE" else ch


class JsonScanner:
    """Validates one JSON value fed in pieces. `feed` stops at the end of the value."""

    def __init__(self) -> None:
        self._stack: list[str] = []  # open containers: "{" or "["
        # What comes next: value, first_key (after "{"), key, colon, after_value,
        # first_item (after "["), string, escape, unicode, number, literal.
        self._expect = "value"
        self._string_is_key = False
        self._hex_left = 0
        self._number = ""
        self._literal = ""
        self.done = False
        self.error = False

    @property
    def depth(self) -> int:
        return len(self._stack)

    def feed(self, text: str) -> int:
        """Consumes characters of `text` while they keep the value valid.

        Returns how many were consumed. Stops early when the value is complete (`done`) or
        the next character cannot continue it (`error`); the rest is the caller's.
        """
        for i, ch in enumerate(text):
            if self.done or self.error:
                return i
            if not self._step(ch):
                if self.done:  # a number ended at a character that is not part of it
                    return i
                self.error = True
                return i
        return len(text)

    def finish(self) -> bool:
        """At the end of the text: is the value complete (a bare number ends only here)?"""
        if not self.done and not self._stack and self._expect == "number":
            self.done = self._number in _NUMBER_DONE
        return self.done

    # ------------------------------------------------------------ automaton

    def _step(self, ch: str) -> bool:
        expect = self._expect
        if expect == "string":
            return self._string_char(ch)
        if expect == "escape":
            if ch not in _ESCAPES:
                return False
            self._hex_left = 4 if ch == "u" else 0
            self._expect = "unicode" if ch == "u" else "string"
            return True
        if expect == "unicode":
            if ch not in _HEX:
                return False
            self._hex_left -= 1
            if self._hex_left == 0:
                self._expect = "string"
            return True
        if expect == "number":
            following = _NUMBER[self._number].get(_number_class(ch))
            if following is not None:
                self._number = following
                return True
            if self._number not in _NUMBER_DONE:
                return False
            self._value_ended()
            return self._step(ch) if not self.done else False
        if expect == "literal":
            if not self._literal or ch != self._literal[0]:
                return False
            self._literal = self._literal[1:]
            if not self._literal:
                self._value_ended()
            return True
        if ch in _WHITESPACE:
            return True
        return self._structural(ch)

    def _structural(self, ch: str) -> bool:
        expect = self._expect
        if expect in ("value", "first_item"):
            if expect == "first_item" and ch == "]":
                return self._close()
            return self._start_value(ch)
        if expect in ("first_key", "key"):
            if expect == "first_key" and ch == "}":
                return self._close()
            if ch != '"':
                return False
            self._string_is_key = True
            self._expect = "string"
            return True
        if expect == "colon":
            if ch != ":":
                return False
            self._expect = "value"
            return True
        if expect == "after_value":
            top = self._stack[-1]
            if ch == ",":
                self._expect = "key" if top == "{" else "value"
                return True
            return self._close() if ch == ("}" if top == "{" else "]") else False
        return False

    def _start_value(self, ch: str) -> bool:
        if ch in "{[":
            self._stack.append(ch)
            self._expect = "first_key" if ch == "{" else "first_item"
            return True
        if ch == '"':
            self._string_is_key = False
            self._expect = "string"
            return True
        if ch == "-" or ch in _DIGITS:
            self._number = _NUMBER["start"][_number_class(ch)]
            self._expect = "number"
            return True
        if ch in _LITERALS:
            self._literal = _LITERALS[ch][1:]
            self._expect = "literal"
            return True
        return False

    def _string_char(self, ch: str) -> bool:
        if ch == '"':
            if self._string_is_key:
                self._expect = "colon"
            else:
                self._value_ended()
            return True
        if ch == "\\":
            self._expect = "escape"
            return True
        return ch >= " "  # control characters must be escaped

    def _close(self) -> bool:
        self._stack.pop()
        self._value_ended()
        return True

    def _value_ended(self) -> None:
        if self._stack:
            self._expect = "after_value"
        else:
            self._expect = "end"
            self.done = True


def scan_complete(text: str) -> int | None:
    """Length of the one complete JSON value at the start of `text` (after whitespace), else
    None. Trailing text is allowed; a bare number must be followed by something."""
    scanner = JsonScanner()
    consumed = scanner.feed(text)
    if scanner.done:
        return consumed
    return None
