# The files that config keys name (password_file, acl_file), read line by
# line. Apart from config.py so that config.py, needed only to build the
# config, can be dropped once it has (config.unload()).


def read_lines(path, key, take):
    # take(line) for each line of the file at path, which config key `key`
    # names. A ValueError it raises comes back naming the file and the
    # line, as does a file that cannot be opened.
    try:
        f = open(path)
    except OSError as e:
        raise ValueError("%s %s: cannot open it (%s)" % (key, path, e))
    n = 0
    try:
        while True:
            n += 1
            try:
                line = f.readline()
                if not line:
                    break
                if n == 1 and line[:1] == "\ufeff":
                    line = line[1:]  # a BOM (Windows' Notepad): not part of the first user's name
                take(line)
            except UnicodeError:  # from readline; MicroPython's says nothing more
                raise ValueError("%s %s line %d: not UTF-8 text" % (key, path, n))
            except OSError as e:  # (a folder opens, and fails here)
                raise ValueError("%s %s: cannot read it (%s)" % (key, path, e))
            except ValueError as e:
                raise ValueError("%s %s line %d: %s" % (key, path, n, e))
    finally:
        f.close()
