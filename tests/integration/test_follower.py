"""Following a compacted topic of several partitions: every key of every partition is read."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaProducer

from crmsync.streams import catalog, optout
from crmsync.streams.kafka import topics
from crmsync.streams.kafka.clients import KafkaClients
from crmsync.streams.kafka.follower import CompactedTopicFollower


async def _fill(bootstrap: str, topic: str, keys: list[str], value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key in keys:
            await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


async def test_a_follower_of_every_partition_reads_every_key(bootstrap: str) -> None:
    topic = f"followed-{uuid.uuid4().hex[:8]}"
    await topics.ensure_topics(
        bootstrap, [topics.TopicSpec(topic, 4, compacted=True, config=topics.COMPACTED)]
    )
    keys = [f"key-{i}" for i in range(60)]
    await _fill(bootstrap, topic, keys, b"v")
    follower = CompactedTopicFollower(KafkaClients(bootstrap), topic, partitions=None)
    await follower.start()
    try:
        await follower.loaded.wait()
        assert sorted(follower.latest) == sorted(keys)
    finally:
        await follower.stop()


async def test_an_opt_in_out_worker_starting_knows_every_contacts_state(bootstrap: str) -> None:
    """What a Start (a new workflow object) reads: the whole state topic, all its partitions;
    a contact whose state were missed would be decided as if never synced."""
    await topics.ensure_topics(bootstrap, catalog.spec("opt-in-out").own_topics(4))
    contacts = [str(uuid.uuid4()) for _ in range(60)]
    state = optout.OptOutState(True, 1_700_000_000_000, "campaign")
    await _fill(bootstrap, topics.OPTOUT_STATE, contacts, optout.state_to_bytes(state))
    spec = catalog.spec("opt-in-out")
    workflow = spec.build(spec.default_config(), KafkaClients(bootstrap))
    await workflow.start()
    try:
        known = {key for key in contacts if workflow._states.get(key) == state}  # type: ignore[attr-defined]
    finally:
        await workflow.stop()
    assert known == set(contacts)
