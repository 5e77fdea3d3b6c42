"""sepit.evaluation"""
