"""names.py: the rules for account and event names, and that they fit the
segment's index entry.  (That hit() applies them and adds nothing on a bad
name, with a real segment, is in test_counter.py.)"""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trafficthreshold import _counter, names, segment

GOOD_ACCOUNTS = [
    "example.com", "a", "x" * 64, "é" * 32, "日本語.example", "user@host-8080", "a~b", "ALL",
    "all.example.com", "with space", "tab-free",
]
# (value, exception, a word the message must contain)
BAD_ACCOUNTS = [
    ("", ValueError, "empty"),
    ("x" * 65, ValueError, "65 bytes"),
    ("é" * 33, ValueError, "66 bytes"),       # 33 characters, 66 UTF-8 bytes
    ("日" * 22, ValueError, "66 bytes"),      # 22 characters, 66 UTF-8 bytes
    ("a\nb", ValueError, "control character"),
    ("a\x00b", ValueError, "control character"),
    ("a\x7fb", ValueError, "control character"),
    ("a\x85b", ValueError, "control character"),   # C1 NEL
    ("a\u2028b", ValueError, "control character"),  # line separator
    ("a\ud800b", ValueError, "control character"),  # a lone surrogate
    ("a/b", ValueError, "'/'"),
    ("/", ValueError, "'/'"),
    ("~overflow", ValueError, "reserved"),
    ("~", ValueError, "reserved"),
    ("all", ValueError, "account=None"),
    (b"example.com", TypeError, "str"),
    (42, TypeError, "str"),
    (["a"], TypeError, "str"),
]


@pytest.mark.parametrize("account", GOOD_ACCOUNTS)
def test_good_accounts_pass(account):
    names.validate(account, "pageview")
    assert names.check_name("account", account, names.ACCOUNT_MAX) is account


@pytest.mark.parametrize("account, exc, word", BAD_ACCOUNTS)
def test_bad_accounts_are_refused_with_a_reason(account, exc, word):
    with pytest.raises(exc) as info:
        names.validate(account, "pageview")
    assert word in str(info.value)


def test_account_none_is_the_total():
    names.validate(None, "pageview")


@pytest.mark.parametrize("event, exc, word", [
    ("", ValueError, "empty"),
    ("e" * 33, ValueError, "33 bytes"),
    ("é" * 17, ValueError, "34 bytes"),
    ("sign\tup", ValueError, "control character"),
    ("a/b/c", ValueError, "more than one '/'"),  # one '/' is a funnel status
    ("~any", ValueError, "reserved"),
    (None, TypeError, "str"),
    (b"pageview", TypeError, "str"),
])
def test_bad_events_are_refused_with_a_reason(event, exc, word):
    with pytest.raises(exc) as info:
        names.validate(None, event)
    assert word in str(info.value)
    with pytest.raises(exc):
        names.validate("example.com", event)


@pytest.mark.parametrize("event", ["pageview", "e" * 32, "é" * 16, "all", "sign-up"])
def test_good_events_pass(event):
    names.validate("example.com", event)
    names.validate(None, event)


def test_messages_say_what_to_do():
    with pytest.raises(ValueError, match="shorten it or hash it"):
        names.validate("x" * 65, "pageview")
    with pytest.raises(ValueError, match="replace it"):
        names.validate("a/b", "pageview")
    with pytest.raises(ValueError, match="strip control characters"):
        names.validate("a\rb", "pageview")


def test_limits_agree_with_the_c_module_and_fit_the_index_entry():
    assert names.ACCOUNT_MAX == _counter.LAYOUT["ACCOUNT_MAX"] == 64
    assert names.EVENT_MAX == _counter.LAYOUT["EVENT_MAX"] == 32
    # account[64] at 16, event[32] at 80, then 16 reserved bytes of 128;
    # the lengths are u8 fields.
    assert segment.E_EVENT - segment.E_ACCOUNT == names.ACCOUNT_MAX
    assert segment.E_EVENT + names.EVENT_MAX <= segment.INDEX_ENTRY_SIZE
    assert names.ACCOUNT_MAX < 256 and names.EVENT_MAX < 256


def test_internal_names_cannot_be_given_by_users():
    # The reserved keys are written by install, never through validate().
    for account, event in ((names.OVERFLOW_ACCOUNT, names.OVERFLOW_EVENT),
                           (names.ALL, names.DEFAULT_EVENT)):
        with pytest.raises(ValueError):
            names.validate(account, event)


def _expected_ok(value: str, limit: int) -> bool:
    import unicodedata
    size = len(value.encode("utf-8", "surrogatepass"))
    return (0 < size <= limit and "/" not in value and ":" not in value
            and not value.startswith("~")
            and not any(unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029"
                        for c in value)
            and value not in (".", "..") and "\\" not in value)


@given(st.text(max_size=40))
def test_rules_hold_for_any_text(value):
    try:
        names.check_name("event", value, names.EVENT_MAX)
    except ValueError:
        assert not _expected_ok(value, names.EVENT_MAX)
    else:
        assert _expected_ok(value, names.EVENT_MAX)
        assert len(value.encode("utf-8")) <= names.EVENT_MAX  # the C code can store it


def test_a_colon_is_refused_in_every_name_naming_the_fix():
    """("shop:order", "paid") and ("shop", "order:paid") would share the
    Redis hash track:shop:order:paid:{Y} (Bootic's keys split on ':'):
    ':' is refused in accounts, events and statuses alike, and no message
    suggests it any more."""
    for account, event in (("shop:order", "paid"), ("shop", "order:paid"),
                           ("shop", "order/pa:id")):
        with pytest.raises(ValueError) as err:
            names.validate(account, event)
        assert "':'" in str(err.value) and "replace it" in str(err.value)
    for bad in ("a/b", "a/b/c"):
        with pytest.raises(ValueError) as err:
            names.validate("shop", bad) if bad.count("/") > 1 else names.validate(bad, "pv")
        assert "':'" not in str(err.value)


# ------------------------------------------------------- funnel statuses

@pytest.mark.parametrize("event, status", [
    ("order", "paid"), ("order", "s" * 26), ("e" * 26, "paid"), ("order", "é" * 13),
    ("order", "all"), ("signup", "confirmed"),
])
def test_a_status_joins_its_event_in_one_key_event_name(event, status):
    key_event = names.funnel_event(event, status)
    assert key_event == f"{event}/{status}"
    names.validate("example.com", key_event)
    names.validate(None, key_event)
    assert names.check_funnel(key_event) == (event, status)
    assert names.split_status(key_event) == (event, status)


@pytest.mark.parametrize("event, status, exc, words", [
    ("order", "", ValueError, ["status name is empty", "'paid'"]),
    ("", "paid", ValueError, ["event name is empty"]),
    ("order", "s" * 27, ValueError, ["33 bytes", "shorten the status"]),
    ("order", "é" * 14, ValueError, ["34 bytes", "fit in 32"]),
    ("order", "a/b", ValueError, ["status name 'a/b' contains '/'", "replace it"]),
    ("ord/er", "paid", ValueError, ["event name 'ord/er' contains '/'"]),
    ("order", "~paid", ValueError, ["status name '~paid' starts with '~'", "reserved"]),
    ("order", "pa\nid", ValueError, ["status name", "control character"]),
    ("order", 3, TypeError, ["status must be a str"]),
    ("~any", "paid", ValueError, ["reserved"]),
])
def test_bad_statuses_are_refused_naming_the_status_and_the_fix(event, status, exc, words):
    with pytest.raises(exc) as info:
        names.funnel_event(event, status)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("key_event, word", [
    ("order/", "status name is empty"), ("/paid", "event name is empty"),
    ("order/paid/x", "more than one '/'"), ("order/" + "s" * 27, "shorten the status"),
    ("order/~x", "reserved"),
])
def test_a_key_event_name_with_a_status_is_checked_part_by_part(key_event, word):
    with pytest.raises(ValueError, match=word):
        names.validate("example.com", key_event)


def test_the_separator_agrees_with_the_c_module_and_no_event_can_contain_it():
    assert names.STATUS_SEP == _counter.STATUS_SEP == "/"
    with pytest.raises(ValueError, match="'/'"):
        names.check_name("event", "order/paid", names.EVENT_MAX)
    assert names.split_status("pageview") == ("pageview", None)


# -- names a stats URL cannot carry (issue #22 item 7) -------------------------


@pytest.mark.parametrize("value, word", [
    (".", "'.' or '..'"), ("..", "'.' or '..'"), ("a\\b", "'\\'"), ("\\", "'\\'"),
    ("..\\..", "'\\'"),
])
@pytest.mark.parametrize("kind", ["account", "event"])
def test_names_a_url_cannot_carry_are_refused(kind, value, word):
    """'.' and '..' are resolved away by every URL library and browser, and
    browsers read '\\' as '/': counted, they could never be read back."""
    with pytest.raises(ValueError) as info:
        names.validate(value, "pageview") if kind == "account" else names.validate("a", value)
    assert word in str(info.value) and "replace" in str(info.value), str(info.value)


@pytest.mark.parametrize("value", ["...", ".a", "a.", "a..b", "example.com."])
def test_dots_within_a_name_are_fine(value):
    names.validate(value, "pageview")


def test_hit_refuses_them_and_counts_nothing(worker_api):
    import trafficthreshold
    for bad in (".", "..", "a\\b"):
        with pytest.raises(ValueError):
            trafficthreshold.hit(bad, "pageview")
        with pytest.raises(ValueError):
            trafficthreshold.hit("acme", bad)
    assert trafficthreshold.count(None, "pageview", window="60s") == 0
