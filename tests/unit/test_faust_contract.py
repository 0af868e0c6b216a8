"""What crmsync overrides in Faust still exists and is still called: a Faust upgrade fails here."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import aiokafka
import faust
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka

from crmsync.streams.consumer import PausableConsumer


def test_the_faust_version_is_the_one_the_overrides_were_checked_against() -> None:
    # consumer.py overrides private methods; read them again before changing this pin.
    assert version("faust-streaming") == "0.15.3"
    assert faust.__version__ == "0.15.3"
    assert aiokafka.__version__.startswith("0.14.")


def test_the_fetch_loop_still_calls_getmany_then_wait_next_records() -> None:
    drain = inspect.getsource(faust_consumer.Consumer._drain_messages)
    assert "getmany = self.getmany" in drain and "getmany(timeout=" in drain
    getmany = inspect.getsource(faust_consumer.Consumer.getmany)
    assert "await self._wait_next_records(timeout)" in getmany


def test_commits_still_go_through_the_two_methods_we_replace() -> None:
    force_commit = inspect.getsource(faust_consumer.Consumer.force_commit)
    assert "self._filter_tps_with_pending_acks(topics)" in force_commit
    committable = inspect.getsource(faust_consumer.Consumer._filter_committable_offsets)
    assert "self._new_offset(tp)" in committable
    for name in ("_filter_tps_with_pending_acks", "_new_offset"):
        theirs = inspect.signature(getattr(faust_consumer.Consumer, name))
        ours = inspect.signature(getattr(PausableConsumer, name))
        assert list(theirs.parameters) == list(ours.parameters), name


def test_the_rebalance_listener_hook_still_runs() -> None:
    thread = inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread)
    assert "self._rebalance_listener = consumer.RebalanceListener(self)" in thread
    listener = faust_aiokafka.ConsumerRebalanceListener
    assert inspect.iscoroutinefunction(listener.on_partitions_assigned)
    assert "consumer_generation_id = generation" in inspect.getsource(
        listener.on_partitions_assigned
    )
    assert PausableConsumer.RebalanceListener.__mro__[1] is listener


def test_the_revoke_signal_is_awaited_before_the_rebalance_goes_on() -> None:
    revoked = inspect.getsource(faust.App._on_partitions_revoked)
    assert "await T(self.on_partitions_revoked.send)(revoked)" in revoked


def test_the_idle_wait_and_the_livelock_check_we_replace_still_exist() -> None:
    assert "_wait_next_records" in vars(faust_consumer.Consumer)
    assert "verify_event_path" in vars(faust_aiokafka.Consumer)
    wait = inspect.getsource(faust_consumer.Consumer._wait_next_records)
    assert "await self.sleep(1)" in wait  # why consumer.py keeps polling while stopped


def test_faust_never_pauses_or_resumes_aiokafka_itself() -> None:
    # Why consumer.py pauses inside aiokafka: Faust's pause only edits its own active set.
    driver = inspect.getsource(faust_aiokafka)
    assert ".pause(" not in driver.replace("def pause", "")
    assert ".resume(" not in driver.replace("def resume", "")


def test_recovery_still_seeks_through_perform_seek_which_we_replace() -> None:
    # Recovery's seek after a rebalance; aiokafka's seek_to_committed, which Faust's version
    # calls, leaves a partition without a commit (or at 0) where it is: ours seeks it too.
    from faust.tables.recovery import Recovery

    resume = inspect.getsource(Recovery._resume_streams)
    assert "consumer.perform_seek()" in resume
    assert "seek_to_committed" in inspect.getsource(faust_consumer.Consumer.perform_seek)
    assert "if offset and offset > 0:" in inspect.getsource(
        aiokafka.AIOKafkaConsumer.seek_to_committed
    )
    assert "perform_seek" in vars(PausableConsumer)
    theirs = inspect.signature(faust_consumer.Consumer.perform_seek)
    assert list(theirs.parameters) == list(
        inspect.signature(PausableConsumer.perform_seek).parameters
    )
