"""spmd.api's parts that need no cluster: stop strings held back and cut, the chat template in its sandbox and its
fallback, request checks, and /health before and after the model has loaded (a real HTTP server on a free port)."""
import contextlib
import json
import re
import socket
import sys
import time
import urllib.error
import urllib.request

import pytest

from spmd import api, chat_template
from spmd.api import BadRequest, Gateway, Server, StopFilter, _json_object, _messages, _prompt, _sampling
from spmd.chat_template import FALLBACK, ChatTemplate, TemplateError


def run_filter(stops, pieces):
    f, out, hit = StopFilter(stops), [], False
    for p in pieces:
        text, hit = f.push(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(f.flush())
    return "".join(out), hit


def test_stop_filter_cuts_across_pieces_and_holds_back():
    assert run_filter(["END"], ["Hello E", "N", "D more"]) == ("Hello ", True)
    assert run_filter(["END"], ["Hello E", "NOUGH"]) == ("Hello ENOUGH", False)  # released once it cannot match
    f = StopFilter(["stop"])
    assert f.push("a st") == ("a ", False)  # "st" could begin "stop": held back
    assert f.push("o") == ("", False)
    assert f.push("ry") == ("story", False)
    assert run_filter(["b", "abc"], ["xxabc"]) == ("xx", True)  # the earliest match wins
    assert run_filter(["abcd", "c"], ["ab", "c", "d"]) == ("ab", True)  # the first one complete, as it streams
    assert run_filter([], ["a", "b"]) == ("ab", False)


def test_stop_filter_against_a_plain_search():
    import random
    rng = random.Random(5)
    for _ in range(300):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        want, seen = (text, False), ""
        for p in pieces:  # the first time the text so far holds a stop string, it ends before the earliest
            seen += p
            found = [i for i in (seen.find(s) for s in stops) if i >= 0]
            if found:
                want = (seen[:min(found)], True)
                break
        assert run_filter(stops, pieces) == want, (text, stops, pieces)


def test_fallback_template():
    t = ChatTemplate(None)
    assert t.builtin
    text = t.render([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert text == "Be kind.\n\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert "Assistant:" in FALLBACK
    tool = t.render([{"role": "user", "content": "2*21?"}, {"role": "tool", "content": "42"}])
    assert tool == "User: 2*21?\nTool: 42\nAssistant:"  # a tool's answer is not the assistant's own line


def test_template_sandbox_and_errors():
    t = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "<s>", "</s>")
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>HI"
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(TemplateError, match="only user"):
        ChatTemplate("{{ raise_exception('only user') }}").render([])
    with pytest.raises(TemplateError):  # the sandbox refuses attribute access to internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])


def test_a_template_that_would_run_for_ever_or_build_gigabytes_is_stopped(monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_LIMIT_S", 0.2)
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}BODY{% endfor %}{% endfor %}x"
    # (the second: Jinja's test catches Exception where the deadline may strike, which must not stop it)
    for body in ("", "{% if messages is sequence %}{% endif %}"):
        for _ in range(5):
            before, t = sys.gettrace(), time.monotonic()
            with pytest.raises(TemplateError, match="took longer than 0.2 s"):
                ChatTemplate(loops.replace("BODY", body)).render([{"role": "user", "content": "hi"}])
            assert time.monotonic() - t < 5 and sys.gettrace() is before  # (the caller's trace function put back)
    with pytest.raises(TemplateError, match="writes more than"):
        ChatTemplate("{% set s = 'x' * 10000000 %}{% for i in range(100) %}{{ s }}{% endfor %}").render([])
    for big in ("{{ 'x' * 100000000 }}", "{{ [1] * 100000000 }}", "{{ 100000000 * 'xy' }}", "{{ 10 ** 100000000 }}",
                "{% set a = 2 ** 40000 %}{{ (a * a) // 7 }}", "{% set a = 2 ** 65536 %}{{ a % 7 }}",
                "{{ 'x'|center(10 ** 10) }}", "{{ 'x'.rjust(10 ** 10) }}", "{{ [1]|batch(10 ** 10, 0)|list }}",
                "{{ [1]|slice(10 ** 10)|list }}", "{{ 'a'|indent(10 ** 10) }}",  # (filters of constants: as it loads)
                "{{ '%099999999d' % 1 }}", "{{ '%*d' % (10 ** 9, 1) }}", "{{ '{:>99999999}'.format(1) }}",
                "{{ '%30000000s'|format('x') }}", "{{ 'x'.ljust(3)|replace('', 'y' * 10000000) }}"):
        with pytest.raises(TemplateError, match="too large"):
            ChatTemplate(big).render([])
    monkeypatch.setattr(chat_template, "RENDER_LIMIT_S", 30.0)  # (these end by their size, at once)
    for big in ("{{ [s] * 60 }}", "{{ ([s] * 60)|string }}", "{{ ([s] * 60)|tojson }}", "{{ 'a' ~ ([s] * 60) }}",
                "{{ '%s' % ([s] * 60,) }}", "{{ ('{0:>16000000}' * 60).format(1) }}", "{{ '{:>99999999}'.format(1) }}",
                "{{ ('\\n' * 60)|indent(s, true, true) }}", "{{ ('x' * 60).replace('', s) }}",
                "{{ ('\\t' * 60).expandtabs(16000000) }}", "{{ ('%(a)16000000s' * 60) % {'a': 1} }}",
                "{{ ('x' * 100)|wordwrap(1, true, s) }}"):  # each made in one call, in C, before any check after
        started = time.monotonic()
        with pytest.raises(TemplateError, match="too large"):
            ChatTemplate("{% set s = 'x' * 16000000 %}" + big).render([])
        assert time.monotonic() - started < 5, big
    with pytest.raises(TemplateError, match="JSON indent over 64"):
        ChatTemplate("{{ range(60)|list|tojson(16000000) }}").render([])
    with pytest.raises(TemplateError, match="sums lists or strings"):  # (cubic: each list copies all before it)
        ChatTemplate("{% set a = [0] * 1500 %}{{ ([a] * 1500)|sum(start=[])|length }}").render([])
    for double in ("s ~ s", "s + s", "[s, s]|join", "s.join([s, s, ''])", "s|replace('x', 'xx')",
                   "[s, s]|join('')|string"):  # each step doubles a string: 2^30 characters at the 30th
        started = time.monotonic()
        with pytest.raises(TemplateError, match="too large"):
            ChatTemplate("{% set n = namespace(s='x') %}{% for i in range(40) %}{% set s = n.s %}"
                         f"{{% set n.s = {double} %}}{{% endfor %}}{{{{ n.s|length }}}}").render([])
        assert time.monotonic() - started < 5
    small = ChatTemplate("{{ '=' * 3 }}{{ 2 ** 10 }}{{ 3 * 4 }}{{ 1.5 * 2 }}|{{ 'x'|center(3) }}{{ 'y'.rjust(2) }}"
                         "{{ [1, 2, 3]|batch(2)|list }}{{ 1700000000 }}{{ 7 // 2 }}{{ 7 % 4 }}{{ 'a' + 'b' }}"
                         "{{ 1 - 3 }}|{{ 'a' ~ 1 ~ none }}{{ ['x', 'y']|join('-') }}{{ '-'.join(['p', 'q']) }}"
                         "{{ 'aXa'|replace('a', 'bb') }}{{ '%3d|%-4s|' % (7, 'z') }}{{ '{:>3}'.format(5) }}"
                         "{{ '%s%s'|format(1, 2) }}{{ [1, 2] + [3] }}{{ messages|map(attribute='x')|join(',') }}")
    want = "===1024123.0| x  y[[1, 2], [3]]170000000033ab-2|a1Nonex-yp-qbbXbb  7|z   |  512[1, 2, 3]1,2"
    assert small.render([{"x": 1}, {"x": 2}]) == want
    numbers = ChatTemplate("{{ 'id 12345678901: %s' % 'q' }}|{{ '**Note** %d' % 20000000 }}|"
                           "{{ 'Cutoff 20231001123 {}'.format('q') }}|{{ [1, 2]|tojson(2)|length }}|{{ [1, 2]|sum }}")
    indented = len(json.dumps([1, 2], indent=2))
    assert numbers.render([]) == f"id 12345678901: q|**Note** 20000000|Cutoff 20231001123 q|{indented}|3"  # not widths


def test_request_checks():
    assert _sampling({})["temperature"] == 1.0  # OpenAI's default
    assert _sampling({"seed": -1})["seed"] == 2**64 - 1
    assert _sampling({"top_p": 0})["top_p"] == 0  # (the most probable token alone, as some clients send it)
    assert _sampling({"stream": True, "stream_options": {"include_usage": None}})["usage"] is False  # null: not given
    for body, param in [({"top_p": -0.1}, "top_p"), ({"temperature": True}, "temperature"), ({"n": 3}, "n"),
                        ({"max_tokens": 1.5}, "max_tokens"), ({"stop": 5}, "stop"), ({"stream": "yes"}, "stream"),
                        ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"seed": "1"}, "seed"),
                        ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options"),
                        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),  # (took as true)
                        ({"stream": True, "stream_options": False}, "stream_options"),  # (falsy: taken as none)
                        ({"stream": True, "stream_options": []}, "stream_options"),
                        ({"stream_options": {"include_usage": True}}, "stream_options"),  # (OpenAI: not unstreamed)
                        ({"max_tokens": "x", "max_completion_tokens": 5}, "max_tokens"),  # both checked
                        ({"max_tokens": 5, "max_completion_tokens": 0}, "max_completion_tokens")]:
        with pytest.raises(BadRequest) as e:
            _sampling(body)
        assert e.value.param == param
    assert _sampling({"frequency_penalty": 0, "logit_bias": {}, "logprobs": False, "top_logprobs": 0, "suffix": "",
                      "tool_choice": "none", "response_format": {"type": "text"}})["max_tokens"] is None  # no-ops
    for body in ({"top_logprobs": 2}, {"suffix": "x"}, {"tool_choice": "required"}, {"best_of": True},
                 {"echo": True}, {"logprobs": True}, {"min_p": 0.05}, {"repeat_penalty": 1.1}, {"ignore_eos": True},
                 {"grammar": "root ::= x"}, {"modalities": ["text", "audio"]}, {"tools": [{"type": "function"}]}):
        with pytest.raises(BadRequest, match="is not supported by spmd") as e:
            _sampling(body)
        assert e.value.param == next(iter(body))
    assert _sampling({"min_p": 0, "repeat_penalty": 1.0, "ignore_eos": False, "modalities": ["text"], "tools": [],
                      "model": "anything"})["max_tokens"] is None  # no-ops
    for body, said in [({"logit_bias": {"5": 10}}, "only null or {}"), ({"tools": [1]}, "only null or []"),
                       ({"logprobs": 0}, "only null or false")]:
        with pytest.raises(BadRequest, match=re.escape(said)):
            _sampling(body)
    with pytest.raises(BadRequest) as e:
        _sampling({"model": 5})
    assert e.value.param == "model"
    assert _messages({"messages": [{"role": "assistant", "content": None}]}) == [{"role": "assistant", "content": ""}]
    for given, cap in [({"max_tokens": 5, "max_completion_tokens": None}, 5), ({"max_completion_tokens": 3}, 3),
                       ({"max_tokens": 5, "max_completion_tokens": 7}, 7), ({"max_tokens": None}, None)]:
        assert _sampling(given)["max_tokens"] == cap, given  # null is not given
    developer = _messages({"messages": [{"role": "developer", "content": "Be brief."}]})
    assert developer == [{"role": "system", "content": "Be brief."}]  # OpenAI's newer name for a system message
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert _messages({"messages": [{"role": "user", "content": parts}]}) == [{"role": "user", "content": "ab"}]
    with pytest.raises(BadRequest, match=re.escape('content[0]: only text parts are supported (got "image_url")')):
        _messages({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    with pytest.raises(BadRequest, match=re.escape("messages[0].content[1].text must be text")):
        parts = [{"type": "text", "text": "a"}, {"type": "text", "text": 5}]
        _messages({"messages": [{"role": "user", "content": parts}]})
    with pytest.raises(BadRequest, match="belongs to /v1/chat/completions") as e:  # a chat body sent to completions
        _prompt({"messages": [{"role": "user", "content": "hi"}]})
    assert e.value.param == "messages"


def test_a_body_must_be_a_json_object_of_text():
    assert _json_object(b'{"prompt": "caf\\u00e9 \\ud83d\\ude00"}') == {"prompt": "caf\u00e9 \U0001F600"}  # a pair
    for raw, said in [(b'{"prompt": "\\ud800"}', "unpaired UTF-16 surrogate"),
                      (b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}', "surrogate"),
                      (b'[1]', "JSON object"), (b'{"a": ', "not JSON"), (b'\xff{}', "not JSON"),
                      (b'{"max_tokens": ' + b"9" * 5000 + b"}", "more digits than this server reads")]:
        with pytest.raises(BadRequest, match=said):
            _json_object(raw)


def served_without_a_cluster(model_id="m"):
    server = Server("127.0.0.1", 0, model_id, 4)
    server.start()
    server.open(Gateway(inbox=None, tokenizer=None, template=None, context=8, n_known=8, slots=1))
    return server


def raw_reply(port, request, timeout=10, until_closed=False):
    """The server's first answer to the bytes sent; until_closed: (all it sent, seconds until it closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        if not until_closed:
            return s.recv(65536).decode("latin-1")
        t, got = time.monotonic(), b""
        while chunk := s.recv(65536):
            got += chunk
        return got.decode("latin-1"), time.monotonic() - t


def test_a_body_that_does_not_decode_or_is_declared_too_large_is_a_json_error():
    """A Content-Encoding whose bytes do not decode is 400, one the server does not decode 415, a declared length
    over the limit 413 at once (not after BODY_WAIT_S), all in the API's JSON error shape; the connection of a
    body left unread closes within LINGER_S."""
    server = served_without_a_cluster()
    try:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        for encoding in (b"gzip", b"deflate"):
            reply = raw_reply(server.port, head + b"Content-Encoding: " + encoding + b"\r\nContent-Length: 5\r\n"
                              b"Connection: close\r\n\r\nhello")
            assert reply.startswith("HTTP/1.1 400"), reply
            error = json.loads(reply.split("\r\n\r\n", 1)[1])["error"]
            assert error["type"] == "invalid_request_error"
            said = f"the body could not be read: Can not decode content-encoding: {encoding.decode()}"
            assert error["message"] == said
        decoded = "not one this server decodes (gzip, deflate)"
        for request, code, said in [(b"Content-Length: 99999999999\r\n\r\n{}", 413, "larger than"),
                                    (b"Content-Encoding: zstdx\r\nContent-Length: 2\r\n\r\n{}", 415, decoded),
                                    (b"Content-Encoding: br\r\nContent-Length: 2\r\n\r\n{}", 415, decoded),
                                    (b"Content-Encoding: zstd\r\nContent-Length: 2\r\n\r\n{}", 415, decoded)]:
            t = time.monotonic()
            reply, closed = raw_reply(server.port, head + request, until_closed=True)
            assert reply.startswith(f"HTTP/1.1 {code}") and time.monotonic() - t < 5, reply
            assert said in json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["message"]
            assert closed < api.LINGER_S + 2  # (the body was not read: the connection goes, soon)
    finally:
        server.stop()


def test_expect_100_continue_is_answered_by_the_declared_length():
    """A body declared over the limit is 413 at once, without the 100 that would have the client send it first (as
    are one of an encoding the server does not decode, 415, and a request while the model loads, 503); one within
    it gets the 100 and then its answer; another Expect is a JSON 417."""
    server = served_without_a_cluster()
    try:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        reply = raw_reply(server.port, head + b"Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n")
        assert reply.startswith("HTTP/1.1 413") and "100 Continue" not in reply, reply
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(head + b"Expect: 100-continue\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
            assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            s.sendall(b'{"n": 3}')
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        assert got.startswith(b"HTTP/1.1 400") and b"'n' must be 1" in got, got  # (the body was read)
        reply = raw_reply(server.port, head + b"Expect: something\r\nContent-Length: 2\r\n\r\n{}")
        assert reply.startswith("HTTP/1.1 417") and json.loads(reply.split("\r\n\r\n", 1)[1])["error"], reply
        reply = raw_reply(server.port, head + b"Expect: 100-continue\r\nContent-Encoding: br\r\n"
                                              b"Content-Length: 2\r\n\r\n")
        assert reply.startswith("HTTP/1.1 415") and "100 Continue" not in reply, reply
    finally:
        server.stop()
    loading = Server("127.0.0.1", 0, "m", 4)
    loading.start()
    try:
        reply = raw_reply(loading.port, head + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        assert reply.startswith("HTTP/1.1 503") and "100 Continue" not in reply, reply
    finally:
        loading.stop()


def test_a_body_is_decoded_whole_and_within_the_limit():
    """gzip (of one member or several) and deflate (zlib's format, or raw as some clients send it) decode; a
    stream that ends early (a gzip body without its trailer was taken), has bytes after its end, or does not decode
    is 400; more than MAX_BODY_BYTES decoded is 413 (a small body that inflates to gigabytes)."""
    import gzip
    import zlib
    from aiohttp import web
    body = b'{"prompt": "a", "max_tokens": 2}' + b" " * 200
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for encoding, data in [("identity", body), ("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
                           ("deflate", raw_deflate.compress(body) + raw_deflate.flush())]:
        assert api.decoded_body(data, encoding) == body
    assert api.decoded_body(gzip.compress(body[:9]) + gzip.compress(body[9:]), "gzip") == body  # two members
    whole = gzip.compress(body)
    for data, said in [(whole[:-8], "its gzip stream ends early"), (whole[:len(whole) // 2], "ends early"),
                       (whole + b"x", "has bytes after its end"), (b"hello", "Can not decode content-encoding")]:
        with pytest.raises(BadRequest, match=said):
            api.decoded_body(data, "gzip")
    with pytest.raises(web.HTTPRequestEntityTooLarge):
        api.decoded_body(gzip.compress(b" " * (api.MAX_BODY_BYTES + 1)), "gzip")


def test_one_model_by_its_id():
    server = served_without_a_cluster()
    try:
        url = f"http://127.0.0.1:{server.port}/v1/models"
        with urllib.request.urlopen(url + "/m", timeout=10) as r:
            listed = json.loads(urllib.request.urlopen(url, timeout=10).read())["data"][0]
            assert json.loads(r.read()) == listed and listed["id"] == "m"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/other", timeout=10)
        assert e.value.code == 404 and json.loads(e.value.read())["error"]["param"] == "model"
    finally:
        server.stop()
    server = served_without_a_cluster("meta-llama/Llama-3-8B")  # (an id with "/" was listed, not found by its path)
    try:
        url = f"http://127.0.0.1:{server.port}/v1/models/"
        for path in ("meta-llama/Llama-3-8B", "meta-llama%2FLlama-3-8B"):
            with urllib.request.urlopen(url + path, timeout=10) as r:
                assert json.loads(r.read())["id"] == "meta-llama/Llama-3-8B"
    finally:
        server.stop()


def test_health_is_503_until_loaded():
    server = Server("127.0.0.1", 0, "m", 4)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/health", timeout=10)
        assert e.value.code == 503 and json.loads(e.value.read())["error"]["type"] == "unavailable_error"
        assert e.value.headers["Retry-After"] == "2"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=b"{}"), timeout=10)
        assert e.value.code == 503
        server.open(Gateway(inbox=None, tokenizer=None, template=None, context=8, n_known=8, slots=1))
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            assert b"<title>spmd</title>" in r.read()
    finally:
        server.stop()


def test_no_such_path_or_method_is_a_json_error():
    """404 and 405 come as the API's JSON error body (aiohttp's own are plain text), 405 with its Allow header."""
    server = Server("127.0.0.1", 0, "m", 4)
    server.start()
    try:
        server.open(Gateway(inbox=None, tokenizer=None, template=None, context=8, n_known=8, slots=1))
        url = f"http://127.0.0.1:{server.port}"
        for request, code in ((urllib.request.Request(url + "/v1/nope"), 404),
                              (urllib.request.Request(url + "/v1/models", data=b"{}"), 405)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(request, timeout=10)
            error = json.loads(e.value.read())["error"]
            assert e.value.code == code and error["type"] == "invalid_request_error"
            assert request.full_url.split(str(server.port))[1] in error["message"]
            assert (e.value.headers.get("Allow") is not None) == (code == 405)
    finally:
        server.stop()


def test_a_body_that_comes_too_slowly_is_408(monkeypatch):
    import socket
    from spmd import api
    monkeypatch.setattr(api, "BODY_WAIT_S", 0.5)
    server = Server("127.0.0.1", 0, "m", 4)
    server.start()
    try:
        server.open(Gateway(inbox=None, tokenizer=None, template=None, context=8, n_known=8, slots=1))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            reply = s.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and "did not come whole" in reply
    finally:
        server.stop()


def test_a_connection_without_a_request_in_progress_is_closed(monkeypatch):
    """Headers sent a byte at a time hold a connection IDLE_S at most (aiohttp has no header timeout), while other
    clients are served; a request in progress (its body still coming) is not cut by that rule."""
    import socket
    from spmd import api
    monkeypatch.setattr(api, "IDLE_S", 1.0)
    monkeypatch.setattr(api, "BODY_WAIT_S", 3.0)
    server = Server("127.0.0.1", 0, "m", 4)
    server.start()
    try:
        server.open(Gateway(inbox=None, tokenizer=None, template=None, context=8, n_known=8, slots=1))
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        busy = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        busy.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        t, closed = time.monotonic(), None
        for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 200:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = time.monotonic() - t
                break
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as r:
                assert r.status == 200  # others are served meanwhile
            time.sleep(0.1)
        assert closed is not None and 1.0 < closed < 4.0
        reply = busy.recv(4096).decode()  # at BODY_WAIT_S, not cut at IDLE_S
        assert reply.startswith("HTTP/1.1 408") and time.monotonic() - t > 2.5
        slow.close()
        busy.close()
    finally:
        server.stop()


def test_a_request_that_is_not_http_is_400_and_one_line_on_the_servers_stderr(caplog):
    import socket
    server = Server("127.0.0.1", 0, "m", 4)
    server.start()
    try:
        for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(raw)
                assert s.recv(4096).startswith(b"HTTP/1.0 400")
        time.sleep(0.2)
    finally:
        server.stop()
    said = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert said and all(r.exc_info is None and "\n" not in r.getMessage() for r in said)
    assert all(r.getMessage().startswith("note: Error handling request from 127.0.0.1: BadHttpMessage") for r in said)


PAGE = "http://page.example:8000"


@pytest.mark.parametrize("cors, origin, allowed", [
    ((PAGE,), PAGE, True), ((PAGE,), "http://other.example", False), (("*",), "http://any.example", True),
    ((), "http://a.example", False)])
def test_cors_lets_the_named_origins_call_the_api(cors, origin, allowed):
    """--cors: a preflight from an allowed origin is 204 with the methods and the headers a browser asks for (OpenAI's
    SDK asks for its own x-stainless-* headers), and responses to it (errors included) name it; a request from
    another origin, on a server without --cors too, is 403 (a page elsewhere may not make the server generate) and
    its preflight 405."""
    server = Server("127.0.0.1", 0, "m", 4, cors)
    server.start()
    try:
        server.open(Gateway(inbox=None, tokenizer=None, template=None, context=8, n_known=8, slots=1))
        url = f"http://127.0.0.1:{server.port}"
        asked = "content-type, authorization, x-stainless-os"
        preflight = urllib.request.Request(url + "/v1/chat/completions", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})
        status, headers, _ = ask(preflight)
        assert status == (204 if allowed else 405)
        want = ("*" if cors == ("*",) else origin) if allowed else None
        assert headers.get("Access-Control-Allow-Origin") == want
        if allowed:
            assert "POST" in headers["Access-Control-Allow-Methods"]
            assert headers["Access-Control-Allow-Headers"] == asked
        status, headers, body = ask(urllib.request.Request(url + "/v1/models", headers={"Origin": origin}))
        assert status == (200 if allowed else 403) and headers.get("Access-Control-Allow-Origin") == want
        status, headers, body = ask(urllib.request.Request(url + "/v1/completions", data=b"[", headers={
            "Origin": origin, "Content-Type": "text/plain"}))  # (a page elsewhere may send this without a preflight)
        assert status == (400 if allowed else 403) and headers.get("Access-Control-Allow-Origin") == want
        if not allowed:
            assert json.loads(body)["error"]["type"] == "permission_error" and "--cors" in body.decode()
    finally:
        server.stop()


def ask(request):
    """(status, headers, body) of a request, errors included."""
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.mark.parametrize("origin, own", [("http://127.0.0.1:{port}", True), ("HTTP://127.0.0.1:{port}", True),
                                         ("https://127.0.0.1:{port}", True), ("http://127.0.0.1:1", False),
                                         ("http://localhost:{port}", False), ("null", False), ("http://[::1", False)])
def test_the_servers_own_page_needs_no_cors(origin, own):
    """A request whose Origin is the server's own (the host and port it was asked at) is answered as any other;
    another, or one that is not a URL, is 403."""
    server = Server("127.0.0.1", 0, "m", 4)
    server.start()
    try:
        server.open(Gateway(inbox=None, tokenizer=None, template=None, context=8, n_known=8, slots=1))
        url = f"http://127.0.0.1:{server.port}"
        status, _, body = ask(urllib.request.Request(url + "/v1/completions", data=b"[", headers={
            "Origin": origin.format(port=server.port), "Content-Type": "application/json"}))
        assert status == (400 if own else 403), body
    finally:
        server.stop()


def test_an_address_is_written_as_a_url_writes_it():
    assert api.address("127.0.0.1", 8080) == "127.0.0.1:8080" and api.address("localhost", 80) == "localhost:80"
    assert api.address("::1", 8080) == "[::1]:8080" and api.address("fe80::1%eth0", 1) == "[fe80::1%eth0]:1"
    assert api.serving_line("m", "::", 8080, 1, 1, 8).startswith("serving m on http://[::]:8080 (")


def test_a_host_name_that_does_not_resolve_is_said_so():
    server = Server("no-such-host.invalid", 0, "m", 4)
    with pytest.raises(OSError) as e:
        server.start()
    assert api.listen_error(e.value).startswith("no such host or address")


@pytest.mark.parametrize("listen, host, answered", [
    ("127.0.0.1", "rebound.example:{port}", False), ("127.0.0.1", "localhost:{port}", True),
    ("127.0.0.1", "LocalHost", True), ("127.0.0.1", "app.localhost:{port}", True), ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "[::1]:{port}", True), ("127.0.0.1", "192.168.1.20:{port}", True),
    ("127.0.0.1", socket.gethostname() + ":{port}", True), ("127.0.0.1", "localhost.rebound.example", False),
    ("0.0.0.0", "rebound.example:{port}", True)])
def test_a_server_on_loopback_answers_only_to_local_names(listen, host, answered):
    """DNS rebinding: a page of another site whose name now resolves to 127.0.0.1 is of the server's own origin, so a
    server that listens on loopback addresses only refuses requests that name it by another name (403), the page and
    the API alike; one that listens on every interface answers any name."""
    server = Server(listen, 0, "m", 4)
    server.start()
    try:
        server.open(Gateway(inbox=None, tokenizer=None, template=None, context=8, n_known=8, slots=1))
        for path in ("/", "/v1/models"):
            name = host.format(port=server.port)
            status, _, body = ask(urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", headers={
                "Host": name, "Origin": f"http://{name}"}))
            assert status == (200 if answered else 403), body
            if not answered:
                assert b"DNS rebinding" in body and name.encode() in body
    finally:
        server.stop()


@contextlib.contextmanager
def reading_nothing(body, drive, model_id="m"):
    """A server whose requests `drive(sink)` answers (the engine's driver stands there), and a client that sent
    `body` to /v1/completions on a socket with a 4 KiB receive buffer and reads nothing: the socket."""
    import threading
    from types import SimpleNamespace
    from spmd.api import Inbox
    inbox = Inbox()
    tokenizer = SimpleNamespace(encode=lambda text: [1, 2], bytes_beyond=lambda text, positions: None)

    def driver():
        while not inbox.closed:
            for work, sink in inbox.take(0.1)[0]:
                drive(sink)
    server = Server("127.0.0.1", 0, model_id, 4)
    server.start()
    server.open(Gateway(inbox=inbox, tokenizer=tokenizer, template=None, context=1 << 20, n_known=8, slots=1))
    thread = threading.Thread(target=driver, daemon=True)
    thread.start()
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", server.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            yield s
    finally:
        inbox.close()
        server.stop()
        thread.join(10)


def test_a_whole_answers_client_that_stops_reading_is_dropped(monkeypatch):
    """A non-streamed answer too is written within WRITE_WAIT_S: a client that sent its request and reads nothing
    (its socket's buffers full) has its connection dropped, the answer cut, where aiohttp's own write waited for
    ever."""
    monkeypatch.setattr(api, "WRITE_WAIT_S", 0.5)
    piece, pieces = "x" * 10000, 2000  # a 20 MB answer: far beyond a connection's buffers

    def drive(sink):
        for n in range(1, pieces + 1):
            sink.piece(piece, n)
        sink.done("length", pieces)
    with reading_nothing(f'{{"prompt": "a", "max_tokens": {pieces}}}'.encode(), drive) as s:
        time.sleep(4)  # the answer is made (20 MB through the sink) and its write stalls past WRITE_WAIT_S
        s.settimeout(10)
        got = 0
        try:
            while chunk := s.recv(1 << 20):
                got += len(chunk)
        except ConnectionResetError:
            pass
        assert got < len(piece) * pieces, f"the whole answer came ({got} bytes): the connection was kept"


def test_a_whole_answers_slow_reader_gets_it_all(monkeypatch):
    """The bound is on each write, not on the whole answer: a client that reads slowly but steadily (8 MB, beyond
    what the sockets' buffers hold, 4 KiB at a time at most 2 MB/s: several times WRITE_WAIT_S) gets the whole
    answer."""
    monkeypatch.setattr(api, "WRITE_WAIT_S", 1.0)
    piece, pieces = "y" * 1000, 8000

    def drive(sink):
        for n in range(1, pieces + 1):
            sink.piece(piece, n)
        sink.done("length", pieces)
    with reading_nothing(f'{{"prompt": "a", "max_tokens": {pieces}}}'.encode(), drive) as s:
        s.settimeout(10)
        data, length = b"", None
        while length is None or len(data) < length:  # (the connection stays open: keep-alive)
            chunk = s.recv(65536)
            assert chunk, f"the connection closed after {len(data)} bytes"
            data += chunk
            if length is None and b"\r\n\r\n" in data:
                head, data = data.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
            time.sleep(0.002)
        assert json.loads(data)["choices"][0]["text"] == piece * pieces


def test_a_streamed_answers_client_that_stops_reading_is_dropped(monkeypatch):
    """A client that sends a streamed request and then takes nothing (its socket's buffers fill) used to hold its
    connection and the write for ever: after WRITE_WAIT_S its sequence is cancelled and the connection dropped."""
    monkeypatch.setattr(api, "WRITE_WAIT_S", 1.0)
    seen = {}

    def drive(sink):  # text until the server cancels the sequence
        t, n = time.monotonic(), 0
        while not sink.cancelled and time.monotonic() - t < 30:
            n += 1
            sink.piece("x", n)
            time.sleep(0.001)
        seen.update(cancelled=sink.cancelled, after=time.monotonic() - t)
        sink.done("length", n)
    # (the model's id is in every chunk: 60 KB a token fills the buffers fast)
    with reading_nothing(b'{"prompt": "a", "stream": true, "max_tokens": 100000}', drive, "m" * 60000):
        deadline = time.monotonic() + 20
        while "cancelled" not in seen and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen.get("cancelled") is True and seen["after"] < 15, seen
