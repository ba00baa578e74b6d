"""GenEval's rules (data/geneval_rules.py) on constructed detections: each clause passes and fails where it should."""
import pytest

from data.geneval_rules import Detection, evaluate, relations, score
from data.shapes_check import caption_metadata


def det(name, cx, cy, size=10.0, score=1.0, color=None):
    h = size / 2
    return Detection(name, score, (cx - h, cy - h, cx + h, cy + h), None, color)


def meta(tag, include, exclude=()):
    return {"tag": tag, "include": list(include), "exclude": list(exclude), "prompt": "p"}


DOG = meta("single_object", [{"class": "dog", "count": 1}])


def test_presence_and_the_03_threshold():
    assert evaluate(DOG, [det("dog", 50, 50)]) == (True, "")
    ok, reason = evaluate(DOG, [det("cat", 50, 50)])
    assert not ok and "expected dog>=1, found 0" in reason
    assert not evaluate(DOG, [])[0]
    assert evaluate(DOG, [det("dog", 50, 50, score=0.31)])[0]
    assert not evaluate(DOG, [det("dog", 50, 50, score=0.3)])[0]  # strictly above the threshold
    assert not evaluate(DOG, [det("dog", 50, 50, score=0.2)])[0]


def test_exact_count_is_include_plus_exclude_with_the_09_threshold():
    two = meta("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}])
    dogs = [det("dog", 10 * i, 10, score=0.95) for i in range(4)]
    assert evaluate(two, dogs[:2])[0]
    assert not evaluate(two, dogs[:1])[0]
    ok, reason = evaluate(two, dogs[:3])
    assert not ok and "expected dog<3, found 3" in reason
    # a third dog at 0.5 is dropped for counting (0.9) but kept under another tag (0.3)
    third = dogs[:2] + [det("dog", 70, 10, score=0.5)]
    assert evaluate(two, third)[0]
    assert not evaluate({**two, "tag": "two_object"}, third)[0]
    assert not evaluate(two, [det("dog", 10, 10, score=0.95), det("dog", 30, 10, score=0.85)])[0]
    assert evaluate(two, dogs[:2], counting_threshold=0.99) == (False, "expected dog>=2, found 0")


def test_at_most_16_objects_per_class():
    dogs = [det("dog", i, 0, score=0.5 + i / 100) for i in range(20)]
    assert evaluate(meta("counting_like", [{"class": "dog", "count": 16}]), dogs)[0]
    assert not evaluate(meta("counting_like", [{"class": "dog", "count": 17}]), dogs)[0]
    # GenEval counts the kept objects only: 20 dogs do not trip an exclude of 17
    assert evaluate(meta("x", [], [{"class": "dog", "count": 17}]), dogs)[0]
    assert not evaluate(meta("x", [], [{"class": "dog", "count": 16}]), dogs)[0]
    assert evaluate(meta("x", [{"class": "dog", "count": 5}]), dogs, max_objects=4) == (False, "expected dog>=5, found 4")


def test_exclude_clause():
    no_dog = meta("x", [{"class": "cat", "count": 1}], [{"class": "dog", "count": 1}])
    assert evaluate(no_dog, [det("cat", 0, 0)])[0]
    assert not evaluate(no_dog, [det("cat", 0, 0), det("dog", 50, 0)])[0]
    assert evaluate(no_dog, [det("cat", 0, 0), det("dog", 50, 0, score=0.1)])[0]


def test_colour_is_checked_on_the_best_objects_only():
    red = meta("colors", [{"class": "dog", "count": 1, "color": "red"}])
    assert evaluate(red, [det("dog", 0, 0, color="red")])[0]
    ok, reason = evaluate(red, [det("dog", 0, 0, score=0.9, color="blue"), det("dog", 50, 0, score=0.8, color="red")])
    assert not ok and "found 1 blue" in reason
    assert evaluate(red, [det("dog", 0, 0, score=0.8, color="blue"), det("dog", 50, 0, score=0.9, color="red")])[0]
    # equal scores: the larger object counts first
    assert not evaluate(red, [det("dog", 0, 0, 5, color="red"), det("dog", 50, 0, 20, color="blue")])[0]
    assert evaluate(red, [det("dog", 0, 0, 5, color="blue"), det("dog", 50, 0, 20, color="red")])[0]
    two_red = meta("x", [{"class": "dog", "count": 2, "color": "red"}])
    assert evaluate(two_red, [det("dog", 0, 0, color="red"), det("dog", 50, 0, color="red")])[0]
    assert not evaluate(two_red, [det("dog", 0, 0, color="red"), det("dog", 50, 0, color="green")])[0]


def test_colour_from_a_classifier_when_the_detector_leaves_it_unset():
    red = meta("colors", [{"class": "dog", "count": 2, "color": "red"}])
    dogs = [det("dog", 0, 0, score=0.9), det("dog", 50, 0, score=0.8), det("dog", 90, 0, score=0.7)]
    seen = []

    def colors(objs):
        seen.append(list(objs))
        return ["red"] * len(objs)

    assert evaluate(red, dogs, color_fn=colors)[0]
    assert seen == [dogs[:2]]  # the classifier sees the count best objects, best first
    assert not evaluate(red, dogs, color_fn=lambda objs: ["red", "pink"])[0]
    with pytest.raises(ValueError, match="colour classifier"):
        evaluate(red, dogs)


@pytest.mark.parametrize("relation,dx,dy", [("left of", -30, 0), ("right of", 30, 0), ("above", 0, -30), ("below", 0, 30)])
def test_each_relation_holds_and_its_opposite_fails(relation, dx, dy):
    m = meta("position", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": [relation, 0]}])
    cat, dog, mirrored = det("cat", 50, 50), det("dog", 50 + dx, 50 + dy), det("dog", 50 - dx, 50 - dy)
    assert evaluate(m, [cat, dog]) == (True, "")
    ok, reason = evaluate(m, [cat, mirrored])
    assert not ok and f"expected dog {relation} target" in reason
    assert not evaluate(m, [dog])[0]  # no target: the target clause did not match
    assert "no target" in evaluate({**m, "include": [{"class": "cat", "count": 1, "color": "red"}, m["include"][1]]},
                                   [det("cat", 50, 50, color="blue"), dog])[1]


def test_relations_use_genevals_margin():
    a, b = det("a", 0, 0), det("b", 20, 0)  # offset -20, shrunk by 0.1 * 20 -> -18 / 20 = -0.9
    assert relations(a, b) == {"left of"} and relations(b, a) == {"right of"}
    assert relations(det("a", 0, 0, 60), det("b", 10, 0, 60)) == set()  # offset 10 < 0.1 * 120
    assert relations(det("a", 0, 0), det("b", 20, 20)) == {"left of", "above"}  # 45 degrees: 0.64 each
    # offset (20, 15): x shrunk 18 / 25 = 0.72, y shrunk 13 / 25 = 0.52 -> both; (20, 12): y 0.43 -> left only
    assert relations(det("a", 0, 0), det("b", 20, 15)) == {"left of", "above"}
    assert relations(det("a", 0, 0), det("b", 20, 12)) == {"left of"}
    assert relations(det("a", 0, 0), det("b", 20, 0), margin=0.6) == set()  # 20 - 0.6 * 20 = 8; 8/20 = 0.4


def test_every_position_target_must_hold():
    m = meta("position", [{"class": "cat", "count": 2}, {"class": "dog", "count": 1, "position": ["left of", 0]}])
    cats = [det("cat", 50, 0), det("cat", 80, 0)]
    assert evaluate(m, [det("dog", 0, 0)] + cats)[0]
    assert not evaluate(m, [det("dog", 65, 0)] + cats)[0]  # right of one of the two cats


def test_malformed_metadata_is_named():
    for bad, words in [({"include": []}, "no 'tag'"),
                       (meta("x", [{"class": "dog", "count": 1, "color": "teal"}]), "teal"),
                       (meta("x", [{"class": "dog", "count": 1, "position": ["near", 0]}]), "relation"),
                       (meta("x", [{"class": "dog"}]), "count")]:
        with pytest.raises(ValueError, match=words):
            evaluate(bad, [])


def test_overall_is_the_mean_of_tag_means():
    rows = [{"tag": "a", "correct": c} for c in (True, False, False)] + [{"tag": "b", "correct": True}]
    s = score(rows)
    assert s["a"] == pytest.approx(1 / 3) and s["b"] == 1.0
    assert s["overall"] == pytest.approx(2 / 3)  # the image mean would be 0.5


def test_shapes_captions_become_genevals_clauses():
    assert caption_metadata("three circles") == {
        "tag": "counting", "include": [{"class": "circle", "count": 3}], "exclude": [{"class": "circle", "count": 4}],
        "prompt": "three circles"}
    m = caption_metadata("a red circle left of a square")
    assert m["tag"] == "position" and m["exclude"] == []
    assert m["include"] == [{"class": "square", "count": 1},
                            {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}]
    assert caption_metadata("a blue square and a green triangle")["include"] == [
        {"class": "square", "count": 1, "color": "blue"}, {"class": "triangle", "count": 1, "color": "green"}]
    circle, square = det("circle", 10, 30), det("square", 50, 30)
    assert evaluate(m, [det("circle", 10, 30, color="red"), square])[0]
    assert not evaluate(caption_metadata("a circle right of a square"), [circle, square])[0]
