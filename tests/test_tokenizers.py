"""Tokenizers (shipped word vocab, local sentencepiece) and the `tokenize` preprocessing op."""

import io

import numpy as np
import pytest

from big_vision_lite.data import ops, shapes, tokenizers


def test_shapes_vocab_file_is_up_to_date():
  with open(tokenizers.SHAPES_VOCAB, encoding="utf-8") as f:
    assert [w.strip() for w in f if w.strip()] == tokenizers.shapes_vocab_words()


def test_word_tokenizer_round_trips_every_caption_word():
  tok = tokenizers.get_tokenizer("bvl_shapes")
  for i in range(50):
    caption = shapes.generate_example("validation", i, image_size=16)["caption"]
    ids = tok.encode(caption)
    assert tokenizers.WordTokenizer.__name__ and tok.unk_id not in ids
    assert tok.decode(ids) == caption
  assert tok.encode("a Zebra") == [tok.ids["a"], tok.unk_id]
  assert tok.decode(tok.encode("a red star") + [tok.eos_id, 5, 6]) == "a red star"


def test_tokenize_op_eos_and_padding():
  tok = tokenizers.get_tokenizer("bvl_shapes")
  fn = ops.get_preprocess_fn("tokenize(6, key='caption', key_result='labels')")
  out = fn({"caption": b"a red star"})
  np.testing.assert_array_equal(out["labels"], tok.encode("a red star") + [tok.eos_id, 0, 0])
  assert out["labels"].dtype == np.int32 and out["caption"] == b"a red star"
  long = "a small red star on a grey background in the top left"
  yes = ops.get_preprocess_fn("tokenize(4, eos='yes')")({"caption": long})["labels"]
  sticky = ops.get_preprocess_fn("tokenize(4, eos='sticky')")({"caption": long})["labels"]
  none = ops.get_preprocess_fn("tokenize(20, eos='none', pad_value=7)")({"caption": long})["labels"]
  np.testing.assert_array_equal(yes, tok.encode(long)[:4])
  np.testing.assert_array_equal(sticky, tok.encode(long)[:3] + [tok.eos_id])
  assert tok.eos_id not in none and none[-1] == 7


def test_tokenize_op_picks_one_of_several_captions():
  fn = ops.get_preprocess_fn("tokenize(4, key='texts')")
  seen = {tuple(fn({"texts": np.array([b"a red star", b"a blue ring"])}, np.random.default_rng(s))["labels"])
          for s in range(20)}
  assert len(seen) == 2


def test_tokenize_errors():
  with pytest.raises(KeyError, match="caption"):
    ops.get_preprocess_fn("tokenize(4)")({"text": "a"})
  with pytest.raises(ValueError, match="eos"):
    ops.get_preprocess_fn("tokenize(4, eos='maybe')")
  with pytest.raises(ValueError, match="unknown tokenizer"):
    ops.get_preprocess_fn("tokenize(4, model='c4_en')")
  with pytest.raises(ValueError, match="must hold text"):
    ops.get_preprocess_fn("tokenize(4)")({"caption": 3})


def test_sentencepiece_from_local_file(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  sentences = [shapes.generate_example("train", i, image_size=16)["caption"] for i in range(300)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=50,
                                 pad_id=0, unk_id=1, bos_id=-1, eos_id=2, minloglevel=2)
  path = tmp_path / "shapes.model"
  path.write_bytes(model.getvalue())
  tok = tokenizers.get_tokenizer(str(path))
  assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (50, 0, 2)
  text = "a large blue hexagon on a beige background at the bottom"
  assert tok.decode(tok.encode(text)) == text
  ids = ops.get_preprocess_fn(f"tokenize(64, model='{path}')")({"caption": text})["labels"]
  assert tok.decode(ids) == text and ids[len(tok.encode(text))] == 2
  with pytest.raises(FileNotFoundError):
    tokenizers.get_tokenizer(str(tmp_path / "missing.model"))
