"""The demo runs end to end and its figures are sane (fewer epochs to keep it fast)."""

from lowbit.examples import digits as demo


def test_demo_runs_and_measures():
    rows = {r["recipe"]: r for r in demo.run(seed=0, epochs=8)}
    fp32 = rows["fp32"]
    assert fp32["accuracy"] > 0.9  # the MLP learned the digits
    w8a8 = rows["w8a8 min-max"]
    assert w8a8["agreement"] >= 0.98
    assert abs(w8a8["accuracy"] - fp32["accuracy"]) <= 0.02
    # int8 weights with per-channel scales are a quarter of fp32 plus the scales.
    assert 0.25 < w8a8["bytes"] / fp32["bytes"] < 0.27
    # 2-bit weights cost accuracy; 4-bit group-wise beats 2-bit per-channel.
    assert rows["w4a16 group-16"]["agreement"] > rows["w2a16 per-channel"]["agreement"]
    table = demo.format_table(list(rows.values()), n_test=540)
    assert "w8a8 entropy" in table and "| fp32 |" in table
