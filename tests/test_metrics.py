"""/metrics after known traffic: counters and token sums equal what was sent."""

from __future__ import annotations

import aiohttp
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.fakeproc import FakeProc


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == w for k, w in labels.items())
    )


def present(samples: dict, name: str, **labels: str) -> float:
    """total() of series that must exist: a gauge that is 0 and a gauge that is missing differ."""
    matching = [lab for (n, lab) in samples if n == name and all(dict(lab).get(k) == w for k, w in labels.items())]
    assert matching, f"no {name} series with {labels}"
    return total(samples, name, **labels)


async def test_counters_and_tokens_match_the_traffic(fake: FakeProc, llmd_for) -> None:
    """1. Three whole chats ("a b c": 3 words + 4 template tokens, 4 generated), one stream via
    the alias ("a b": 6 prompt, 5 generated), one unknown model. 2. The counters equal those
    inputs (computed from the fake's model, not read back from answers), gauges exist and are
    idle, the ledger queue is flushed to 0."""
    async with llmd_for(fake) as llmd:
        c = openai.AsyncOpenAI(base_url=llmd.url + "/v1", api_key="x", max_retries=0)
        for _ in range(3):
            await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b c"}], max_tokens=4)
        stream = await c.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "a b"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _ in stream:
            pass
        prompt, completion = 3 * (3 + 4) + (2 + 4), 3 * 4 + 5
        try:
            await c.chat.completions.create(model="nope", messages=[])
        except openai.NotFoundError:
            pass
        await wait_for(lambda: llmd.services.pools["m"].admission.depth == 0)
        await llmd.services.ledger.flush()
        m = await scrape(llmd.url)
    assert total(m, "llmd_requests_total", route="chat", model="m", key="anonymous", status="200") == 4
    assert total(m, "llmd_requests_total", route="chat", status="404") == 1
    assert total(m, "llmd_tokens_total", model="m", key="anonymous", type="prompt") == prompt
    assert total(m, "llmd_tokens_total", model="m", key="anonymous", type="completion") == completion
    assert total(m, "llmd_time_to_first_token_seconds_count", model="m") == 1
    assert total(m, "llmd_request_duration_seconds_count", route="chat", model="m") == 4
    assert total(m, "llmd_overhead_seconds_count", route="chat") == 5
    assert present(m, "llmd_in_flight", model="m") == 0
    assert present(m, "llmd_queue_depth", model="m") == 0
    assert present(m, "llmd_replica_state", model="m", state="ready") == 1
    assert present(m, "llmd_usage_pending_rows") == 0  # flushed just before the scrape
    # Unknown model names never become label values (bounded cardinality).
    assert not any(dict(lab).get("model") == "nope" for (_, lab) in m)


async def test_metrics_can_be_switched_off(fake: FakeProc, llmd_for) -> None:
    async with llmd_for(fake, server={"metrics": False}) as llmd:
        c = openai.AsyncOpenAI(base_url=llmd.url + "/v1", api_key="x", max_retries=0)
        await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        m = await scrape(llmd.url)
    assert total(m, "llmd_requests_total") == 0
