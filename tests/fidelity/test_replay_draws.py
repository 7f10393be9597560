"""Issue 16 item 19: replay draws without replacement, as Mammoth's ``get_data``
(``np.random.choice(min(num_seen, buffer_size), size=min(size, filled), replace=False)``), from the buffer's own
generator; ``ReplayBuffer.sample(n, replace=True)`` keeps the former draw with replacement."""

from __future__ import annotations

import torch

from zoo.continual import ExperienceReplay, ReplayBuffer


def filled(n: int, capacity: int = 50) -> ReplayBuffer:
    buf = ReplayBuffer(capacity, seed=3)
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds the value i: rows are identifiable
    buf.add(x, torch.arange(n) % 10, torch.zeros(n, dtype=torch.long), torch.randn(n, 10))
    return buf


def test_draws_have_distinct_rows_and_never_more_than_the_buffer_holds():
    for stored, n in [(50, 32), (50, 50), (20, 32), (200, 49)]:
        buf = filled(stored)
        for _ in range(20):
            x, y, t, z = buf.sample(n)
            assert len(x) == len(y) == len(t) == len(z) == min(n, len(buf))
            assert len(x[:, 0].unique()) == len(x)  # no row twice


def test_draws_are_uniform_and_reproducible_from_the_buffer_state():
    buf = filled(20)
    counts = torch.zeros(20)
    for _ in range(400):
        counts.index_add_(0, buf.sample(5)[0][:, 0].long(), torch.ones(5))
    assert counts.min() > 0.6 * 100 and counts.max() < 1.4 * 100  # 400 * 5 / 20 = 100 per row
    state = buf.state_dict()
    again = ReplayBuffer(50, seed=99)
    again.load_state_dict(state)
    assert torch.equal(buf.sample(7)[0], again.sample(7)[0])


def test_replace_true_keeps_drawing_with_replacement():
    buf = filled(20)
    draws = [buf.sample(32, replace=True)[0][:, 0] for _ in range(5)]
    assert all(len(d) == 32 for d in draws)  # more than the buffer holds
    assert all(len(d.unique()) < len(d) for d in draws)  # repeated rows
    assert len(filled(50).sample(10, replace=True)[0]) == 10


def test_a_modules_replay_term_draws_without_replacement():
    from tests.zoo.test_continual import MLP, attach, first_batch
    from zoo.continual import ER

    model = ER(**MLP, buffer_size=20, replay_batch_size=8)
    stream = attach(model)
    batch = first_batch(stream, 0, 3)
    model.buffer.add(batch.raw, batch.targets, batch.task, torch.randn(3, 10))
    x, y, _, _ = ExperienceReplay().draw(model)
    assert len(x) == len(y) == 3  # all the buffer holds, once each
