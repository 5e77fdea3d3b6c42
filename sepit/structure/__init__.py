"""sepit.structure"""
