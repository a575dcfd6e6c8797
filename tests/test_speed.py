from layerprune import speed

from common import tiny_model


def test_original_and_pruned_run_interleaved(monkeypatch):
    order = []
    real = speed._seconds

    def timed(fn):
        order.append(fn)
        return real(fn)

    monkeypatch.setattr(speed, "_seconds", timed)
    original, pruned = tiny_model("llama"), tiny_model("llama", layers=4)
    result = speed.compare_speed(original, pruned, repeats=3, prompt_tokens=16, new_tokens=4)
    assert set(result) == {"prefill", "decode"}
    for workload in result.values():
        assert workload["repeats"] == 3
        for key in ("original", "pruned", "ratio"):
            assert workload[key]["min"] <= workload[key]["median"] <= workload[key]["max"]
    prefill = order[:6]  # original, pruned, original, pruned, ...
    assert prefill[0] is not prefill[1] and prefill[0] is prefill[2] and prefill[1] is prefill[3]


def test_the_prompt_fits_the_model_context():
    model = tiny_model("llama")  # 128 positions
    result = speed.compare_speed(model, model, repeats=1, prompt_tokens=4096, new_tokens=4)
    assert result["prefill"]["original"]["median"] > 0
