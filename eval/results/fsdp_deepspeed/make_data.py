import json, torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LlamaForCausalLM(cfg).save_pretrained("model")
# byte-level-ish char tokenizer with 256 ids
vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?"):
    vocab[c] = len(vocab)
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
ft.save_pretrained("model")
import random
random.seed(0)
words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat", "quick", "brown", "fox"]
with open("data.jsonl", "w") as f:
    for i in range(64):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(10)) + "."}) + "\n")
print(ft("the cat").input_ids)
