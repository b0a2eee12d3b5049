"""RACE's prompt as lm_eval 0.4.9 built it (task version 2.0), for the paper's RACE column.

An article comes with several questions; the prompt is the article, every earlier question with its answer, then the
last question. A fill-in-the-blank question ending in "  _  ." contributes `question[-5:]` (the blank marker itself,
" _  .") followed by its answer: that is 0.4.9's rendering, kept on purpose. Version 3.0 (lm_eval 0.4.13) uses
`question[:-5]` (the stem without the blank), which changes the context of every such document.
"""

import ast

LETTER = {"A": 0, "B": 1, "C": 2, "D": 3}


def problems(doc: dict) -> list[dict]:
    return ast.literal_eval(doc["problems"])


def answer_text(problem: dict) -> str:
    return problem["options"][LETTER[problem["answer"]]]


def doc_to_text(doc: dict) -> str:
    text = "Article: " + doc["article"] + "\n\n"
    *earlier, last = problems(doc)
    for problem in earlier:
        if problem["question"][-6:] == "  _  .":
            text += problem["question"][-5:] + answer_text(problem) + "\n"
        else:
            text += "Question: " + problem["question"] + "\n" + "Answer: " + answer_text(problem) + "\n"
    return text + last["question"]


def doc_to_choice(doc: dict) -> list[str]:
    return problems(doc)[-1]["options"][:4]


def doc_to_target(doc: dict) -> int:
    return LETTER[problems(doc)[-1]["answer"]]
