"""The scheduler's promises, checked on plain data: batching, blocks, slots, fairness."""

from __future__ import annotations

from engine.scheduler import Scheduler, SchedulerConfig, Sequence


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=64, max_loras=2) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, max_tokens, block_size, num_blocks, max_loras))


def run_step(sched: Scheduler, next_token: int = 7):
    batch = sched.schedule()
    sampled = {s.request_id: next_token for s in batch.seqs if s.needs_logits}
    sched.on_step_done(batch, sampled)
    return batch


def test_new_requests_join_running_batch_between_steps():
    sched = make()
    sched.add(Sequence("a", list(range(5))))
    first = run_step(sched)
    assert [s.request_id for s in first.seqs] == ["a"]
    sched.add(Sequence("b", list(range(3))))
    second = run_step(sched)
    assert {s.request_id: len(s.token_ids) for s in second.seqs} == {"a": 1, "b": 3}
    assert second.seqs[0].start_position == 5


def test_long_prompt_is_chunked_under_the_token_budget():
    sched = make(max_tokens=8)
    sched.add(Sequence("a", list(range(20))))
    chunks = [run_step(sched).seqs[0] for _ in range(3)]
    assert [len(c.token_ids) for c in chunks] == [8, 8, 4]
    assert [c.needs_logits for c in chunks] == [False, False, True]
    assert sched.get("a").token_ids[-1] == 7


def test_finish_returns_blocks_at_once():
    sched = make(num_blocks=10)
    sched.add(Sequence("a", list(range(9))))
    run_step(sched)
    assert sched.blocks.num_free_blocks == 7
    sched.finish("a")
    assert sched.blocks.num_free_blocks == 10
    assert not sched.has_work()


def test_preemption_when_blocks_run_out_recomputes_later():
    sched = make(num_blocks=4, block_size=4, max_tokens=64)
    sched.add(Sequence("old", list(range(8))))  # 2 blocks
    sched.add(Sequence("new", list(range(8))))  # 2 blocks
    run_step(sched)  # both prefilled and sampled: all 4 blocks used
    assert sched.blocks.num_free_blocks == 0
    batch = run_step(sched)  # both need a third block: the newer one is preempted
    assert batch.preempted == ("new",)
    assert [s.request_id for s in batch.seqs] == ["old"]
    preempted = sched.get("new")
    assert preempted.num_computed_tokens == 0 and preempted.token_ids[-1] == 7
    sched.finish("old")
    batch = run_step(sched)
    assert batch.seqs[0].request_id == "new" and len(batch.seqs[0].token_ids) == 9


def test_adapter_waits_for_a_slot_while_others_proceed():
    sched = make(max_loras=1)
    sched.add(Sequence("x1", [1, 2], adapter_id="x"))
    sched.add(Sequence("y1", [1, 2], adapter_id="y"))
    sched.add(Sequence("base", [1, 2]))
    batch = run_step(sched)
    assert {s.request_id for s in batch.seqs} == {"base"}  # x1 waits for its copy
    assert batch.slot_loads == ((0, "x"),)
    batch = run_step(sched)
    assert {s.request_id for s in batch.seqs} == {"x1", "base"}  # y1 has no slot
    sched.finish("x1")
    batch = run_step(sched)
    assert batch.slot_loads == ((0, "y"),)
    assert "y1" not in {s.request_id for s in batch.seqs}
    assert "y1" in {s.request_id for s in run_step(sched).seqs}


def test_no_sequence_reads_a_slot_in_the_step_that_fills_it():
    sched = make(max_loras=2)
    sched.add(Sequence("x1", [1, 2, 3], adapter_id="x"))
    sched.add(Sequence("x2", [4, 5], adapter_id="x"))
    sched.add(Sequence("base", [1]))
    batch = run_step(sched)
    assert batch.slot_loads == ((0, "x"),)
    assert [s.request_id for s in batch.seqs] == ["base"]
    assert sched.blocks.num_free_blocks == 64 - 3  # x1 and x2 hold their blocks meanwhile
    batch = run_step(sched)
    assert batch.slot_loads == ()
    assert {s.request_id: len(s.token_ids) for s in batch.seqs} == {"x1": 3, "x2": 2, "base": 1}
    assert {s.adapter_slot for s in batch.seqs if s.request_id != "base"} == {0}


def test_idle_slot_is_reused_without_reload():
    sched = make(max_loras=2)
    sched.add(Sequence("x1", [1], adapter_id="x"))
    run_step(sched)
    run_step(sched)
    sched.finish("x1")
    sched.add(Sequence("x2", [1], adapter_id="x"))
    batch = run_step(sched)
    assert batch.slot_loads == ()
    assert batch.seqs[0].adapter_slot == 0


def test_forgotten_adapter_frees_its_slot_after_last_request():
    sched = make(max_loras=1)
    sched.add(Sequence("x1", [1], adapter_id="x"))
    run_step(sched)
    sched.slots.forget("x")
    assert not sched.slots.can_acquire("x")
    sched.finish("x1")
    assert sched.slots.slot_of("x") is None and sched.slots.can_acquire("y")


def test_hot_tenant_does_not_starve_others():
    sched = make(max_num_seqs=2)
    for i in range(10):
        sched.add(Sequence(f"hot{i}", [1, 2], tenant="hot"))
    sched.add(Sequence("cold", [1, 2], tenant="cold"))
    batch = run_step(sched)
    assert {s.request_id for s in batch.seqs} == {"hot0", "cold"}


def test_an_adapter_waiting_for_a_slot_is_not_starved_by_busy_adapters():
    sched = make(max_loras=2, max_num_seqs=16, num_blocks=256)

    def step(n: int) -> None:
        # Adapters a and b always have a fresh request arriving, each lasting a few steps.
        sched.add(Sequence(f"a{n}", [1, 2], adapter_id="a", tenant="a"))
        sched.add(Sequence(f"b{n}", [1, 2], adapter_id="b", tenant="b"))
        run_step(sched)
        for seq in list(sched._running):
            if seq.request_id != "c" and seq.num_tokens >= 5:
                sched.finish(seq.request_id)

    for n in range(3):
        step(n)
    sched.add(Sequence("c", [1, 2], adapter_id="c", tenant="c"))
    n = 3
    while sched.get("c").adapter_slot < 0 and n < 50:
        step(n)
        n += 1
    assert sched.get("c").adapter_slot >= 0, "c never got a slot"
