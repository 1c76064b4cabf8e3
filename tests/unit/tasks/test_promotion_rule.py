"""The promotion rule's defaults follow the kind of data; what is set explicitly is kept."""

from tasks.promotion import PromotionRule


def test_the_rule_uses_the_datas_headline_metrics_unless_told_otherwise():
    assert PromotionRule().for_kind("image") == PromotionRule("fd", ("fd", "class_accuracy"), 0.10)
    assert PromotionRule().for_kind("points") == PromotionRule("sliced_wasserstein", ("sliced_wasserstein",), 0.10)
    chosen = PromotionRule("kid", ("kid", "recall"), 0.05)
    assert chosen.for_kind("image") == chosen and chosen.for_kind("points") == chosen
