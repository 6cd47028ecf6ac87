"""lmforge-serve with the official ``openai`` client: a server in a subprocess on a free localhost port."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import DATA_DIR, SERVE, TINY, make_cfg, requires_data, serving

openai = pytest.importorskip("openai")
pytestmark = requires_data
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nWe", "KING", "What say", "\n", "To be", "MENENIUS:"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from lmforge.training import run_training

    overrides = [
        *TINY,
        "trainer.max_steps=40",
        "trainer.val_check_interval=20",
        "model.n_positions=256",
        "task.data.block_size=64",
    ]  # room for long completions
    return run_training(make_cfg(overrides, tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def lm_server(lm_run):
    with serving(f"run={lm_run['run_dir']}", "max_batch_size=4", "max_tokens=200") as (url, _):
        yield url, Path(lm_run["run_dir"]).name


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def complete(url: str, model: str, prompt: str, **options) -> str:
    return client(url).completions.create(model=model, prompt=prompt, **options).choices[0].text


def test_models_completion_and_stream_agree(lm_server):
    url, model = lm_server
    api = client(url)
    assert [m.id for m in api.models.list().data] == [model]
    for options in ({"temperature": 0}, {"temperature": 0.9, "seed": 5}):
        whole = api.completions.create(model=model, prompt="ROMEO:", max_tokens=40, **options)
        text = whole.choices[0].text
        assert len(text) > 0 and whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == 40 and whole.usage.prompt_tokens == len("ROMEO:")  # a char tokenizer
        chunks = list(api.completions.create(model=model, prompt="ROMEO:", max_tokens=40, stream=True, **options))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 10  # token by token


def test_chat_with_the_plain_template(lm_server):
    url, model = lm_server
    api = client(url)
    messages = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Who is there?"}]
    reply = api.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0.8, seed=2)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    prompt = "system: Speak verse.\nuser: Who is there?\nassistant:"
    assert reply.usage.prompt_tokens == len(prompt)
    streamed = api.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0.8, seed=2,
                                           stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content
    # Without the chat wrapper, the same prompt gives the same text (up to the chat's stop at "\nuser:").
    plain = complete(url, model, prompt, max_tokens=30, temperature=0.8, seed=2)
    assert plain.split("\nuser:")[0] == reply.choices[0].message.content


def test_concurrent_requests_get_what_they_get_alone(lm_server):
    url, model = lm_server
    requests = [dict(prompt=p, max_tokens=24 + 7 * i, temperature=0.0 if i % 2 else 1.0, seed=i)
                for i, p in enumerate(PROMPTS)]  # fmt: skip
    alone = [complete(url, model, **r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:  # 8 clients, 4 rows: some wait for a free row
        together = list(pool.map(lambda r: complete(url, model, **r), requests))
    assert together == alone
    assert len(set(alone)) == len(alone)


def test_n_choices_seed_and_stop(lm_server):
    url, model = lm_server
    api = client(url)
    first = api.completions.create(model=model, prompt="ROMEO:", max_tokens=30, n=3, seed=11, temperature=1.0)
    again = api.completions.create(model=model, prompt="ROMEO:", max_tokens=30, n=3, seed=11, temperature=1.0)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and len(set(texts)) == 3
    full = texts[0]
    stop = next(full[i : i + 2] for i in range(5, len(full) - 2) if full[i : i + 2].strip())  # a pair from the text
    cut = api.completions.create(
        model=model, prompt="ROMEO:", max_tokens=30, n=1, seed=11, temperature=1.0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = api.completions.create(model=model, prompt="ROMEO:", max_tokens=30, seed=11, temperature=1.0,
                                      stop=stop, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_bad_requests_are_openai_errors_and_the_server_goes_on(lm_server):
    url, model = lm_server
    api = client(url)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.completions.create(model=model, prompt="hi", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256") as err:
        api.completions.create(model=model, prompt="x" * 250, max_tokens=10)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported"):
        api.completions.create(model=model, prompt="hi", logprobs=2)
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: guidance"):
        api.completions.create(model=model, prompt="hi", extra_body={"guidance": 2})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=7)
    with pytest.raises(openai.BadRequestError, match="role"):
        api.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="/v1/completions"):
        api.embeddings.create(model=model, input="hi")
    raw = httpx.post(
        f"{url}/v1/completions", content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["message"].startswith("Unknown request URL")
    assert complete(url, model, "ROMEO:", max_tokens=5, temperature=0)  # still serving


def test_a_client_that_leaves_mid_stream_frees_its_row(lm_run):
    with serving(f"run={lm_run['run_dir']}", "max_batch_size=1") as (url, _):
        model = Path(lm_run["run_dir"]).name
        body = {"model": model, "prompt": "ROMEO:", "max_tokens": 240, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            next(response.iter_lines())  # the stream has started; the client goes away
        start = time.monotonic()
        assert complete(url, model, "KING", max_tokens=5, temperature=0)  # the only row is free again
        assert time.monotonic() - start < 10
        assert httpx.get(f"{url}/health").json()["busy_rows"] == 0


def test_api_key_is_required_and_never_logged_and_sigterm_drains(lm_run):
    key = "sk-test-7b1f0c2e"
    with serving(f"run={lm_run['run_dir']}", "access_log=true", env={"LMFORGE_API_KEY": key}) as (url, proc):
        model = Path(lm_run["run_dir"]).name
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        results = []
        worker = threading.Thread(
            target=lambda: results.append(
                client(url, api_key=key).completions.create(model=model, prompt="ROMEO:", max_tokens=200, temperature=0)
            )
        )
        worker.start()
        time.sleep(1.0)  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        worker.join(60)
        assert results and results[0].choices[0].finish_reason == "length"  # drained, not cut
        assert proc.wait(30) == 0
        log = proc.stdout.read()
        assert key not in log and "POST /v1/completions" in log


def test_a_classifier_run_labels_texts(sst2_run):
    with serving(f"run={sst2_run['run_dir']}") as (url, _):
        model = Path(sst2_run["run_dir"]).name
        body = {"model": model, "input": ["a gorgeous, witty, moving film", "a dull, tedious mess"]}
        labels = httpx.post(f"{url}/v1/classify", json=body).json()["data"]
        assert [r["label"] for r in labels] == ["positive", "negative"]
        assert abs(sum(labels[0]["probabilities"].values()) - 1) < 1e-3
        with ThreadPoolExecutor(4) as pool:  # batched together, the same answers
            again = list(pool.map(lambda t: httpx.post(f"{url}/v1/classify", json={"model": model, "input": t}).json(),
                                  body["input"] * 2))  # fmt: skip
        assert [r["data"][0]["label"] for r in again] == ["positive", "negative"] * 2
        assert httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x"}).status_code == 400


def test_hugging_face_folders_generate_and_embed(tmp_path):
    transformers = pytest.importorskip("transformers")
    import shutil

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    gpt2 = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128)
                                 ).save_pretrained(gpt2)  # fmt: skip
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(DATA_DIR) / "tokenizers/gpt2" / name, gpt2)
    with serving(f"model.pretrained={gpt2}") as (url, _):
        text = complete(url, "tiny-gpt2", "Hello, my name is", max_tokens=12, temperature=0)
        reference = transformers.GPT2LMHeadModel.from_pretrained(gpt2).eval()
        tokenizer = transformers.GPT2TokenizerFast.from_pretrained(gpt2)
        ids = tokenizer("Hello, my name is", return_tensors="pt").input_ids
        out = reference.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=50256)
        assert text == tokenizer.decode(out[0, ids.shape[1] :])  # greedy, token for token
    bert = tmp_path / "tiny-bert"
    transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                                   intermediate_size=128)).save_pretrained(bert)  # fmt: skip
    shutil.copy(Path(DATA_DIR) / "tokenizers/bert-base-uncased/vocab.txt", bert)
    with serving(f"model.pretrained={bert}") as (url, _):
        vectors = client(url).embeddings.create(model="tiny-bert", input=["a cat", "a dog", "a cat"]).data
        assert len(vectors[0].embedding) == 64 and vectors[0].embedding == pytest.approx(vectors[2].embedding)
        assert sum(x * x for x in vectors[1].embedding) == pytest.approx(1.0, rel=1e-4)


def test_serve_without_a_model_is_one_sentence(tmp_path):
    done = subprocess.run([SERVE], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Say what to serve" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    done = subprocess.run([SERVE, f"run={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a run directory" in done.stderr + done.stdout


def test_streams_are_server_sent_events_in_openai_chunks(lm_server):
    url, model = lm_server
    body = {
        "model": model,
        "prompt": "ROMEO:",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


def test_a_t5_folder_generates_as_transformers_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    import shutil

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    folder = tmp_path / "tiny-t5"
    config = transformers.T5Config(vocab_size=50257, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):  # any tokenizer the folder ships will do: GPT-2's here
        shutil.copy(Path(DATA_DIR) / "tokenizers/gpt2" / name, folder)
    source = "translate English to German: the house is small"
    with serving(f"model.pretrained={folder}") as (url, _):
        text = complete(url, "tiny-t5", source, max_tokens=10, temperature=0)
    reference = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(folder)
    out = reference.generate(tokenizer(source, return_tensors="pt").input_ids, max_new_tokens=10, do_sample=False)
    ids = out[0, 1:].tolist()  # after the start token, up to the end token
    assert text == tokenizer.decode(ids[: ids.index(1)] if 1 in ids else ids).strip()


def test_a_request_over_its_time_is_a_408_and_frees_its_row(lm_run):
    with serving(f"run={lm_run['run_dir']}", "max_batch_size=1", "request_timeout_s=0.05") as (url, _):
        # Token 10 always wins, so the end-of-text token cannot end it early: 240 steps, well over 0.05 s.
        body = {"model": Path(lm_run["run_dir"]).name, "prompt": "ROMEO:", "max_tokens": 240, "logit_bias": {"10": 100}}
        late = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert late.status_code == 408 and late.json()["error"]["code"] == "request_timeout"
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["busy_rows"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json()["busy_rows"] == 0
