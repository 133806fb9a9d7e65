"""Language models: from text to n-gram LMs and decoding graphs, and decoders behind one interface.

Modules, in pipeline order:

- :mod:`b2txt.lm.text` — LM training text: normalise, keep lexicon words, ``<unk>`` for the rest.
- :mod:`b2txt.lm.ngram` — n-gram estimation (KenLM ``lmplz`` or SRILM ``ngram-count``; KenLM ``build_binary``).
- :mod:`b2txt.lm.arpa` — an ARPA made elsewhere (SRILM, a published or a lab's LM): checked, lower-cased, binary.
- :mod:`b2txt.lm.graph` — ``TLG.fst`` + ``words.txt`` (and ``G.fst``) with kaldifst + kaldilm,
  in the published layout and unit order.
- :mod:`b2txt.lm.nbest` — the decoder interface: input checks, frame scores, :class:`NBest`,
  n-best augmentation.
- :mod:`b2txt.lm.wfst` — WFST decoder (kaldi-decoder) on a TLG graph, ours or published.
- :mod:`b2txt.lm.lexicon_search` — lexicon beam search (flashlight-text + KenLM), low memory.
- :mod:`b2txt.lm.rescore` — large-language-model rescoring of an n-best list (transformers).
- :mod:`b2txt.lm.core` — the decoding core: the decoder factory and cache, decode -> augment ->
  rescore for one trial; every runtime (the pool below, the LM server, the lm-workers) uses it.
- :mod:`b2txt.lm.pool` — ``b2txt decode``: a logits file decoded by a pool of processes.
"""
