"""`kvtier demo` end to end, on the tiny model (the README's main command uses the ~82M one)."""

from __future__ import annotations


def test_demo_hits_after_restart_and_outputs_match(tmp_path):
    from kvtier.vllm.demo import run_demo

    lines: list[str] = []
    result = run_demo(size="tiny", doc_tokens=512, questions=2, question_tokens=32, answer_tokens=4,
                      disk_path=str(tmp_path / "disk"), out=lines.append)
    print("\n".join(lines))
    assert result["all_match"], result["rows"]
    cold, warm, restart = result["rows"]
    assert cold["hit_rate"] == 0 and warm["hit_rate"] == 0
    assert restart["hit_rate"] >= 0.8, "after the restart the document did not come from kvtier's disk tier"
    assert any("TTFT" in line for line in lines)
