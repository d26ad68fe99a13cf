# The board twin's variant (see mpconfigvariant.h); tools/twin.py passes the
# frozen manifest and the 32-bit flags.
