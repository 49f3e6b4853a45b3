"""The tiny world: a synthetic task, tokenizer, policy and PRM built offline for the demo and tests.

    corpus.py     the free-form arithmetic corpus (the default tokenizer's text)
    tokenizer.py  the byte-level BPE and the checks of its layout ("\\n\\n" and "\\n" one token each)
    models.py     the tiny Qwen2 policy and PRM builders (one shared size)
    task.py       the arithmetic task: problems, flawed solutions, error kinds, data files, drills
    quality.py    generation and the policy's quality figures, graded by the verify service's grader
    labeller.py   first-error step labels for any solution of a task question, and its first error
    world.py      BootstrapConfig, QUICK, TinyWorld, the cache and its manifest, `bootstrap`

`puremesh bootstrap` (cli/bootstrap.py) is its command; `python -m puremesh.tinyworld` checks by
hand that vLLM loads a tiny policy (__main__.py). Which packages it may import: docs/LAYOUT.md.
"""
