"""Labeling configs: what we read from them, and a clear error for those we cannot serve."""
import pytest

from backend.labeling_config import ConfigError, default_config_xml, parse


def test_default_config_has_the_face_box_and_six_per_face_attributes():
    config = parse(default_config_xml())
    assert (config.image_name, config.image_key) == ("image", "image")
    assert (config.face_name, config.face_label) == ("face", "Face")
    assert config.names == ["gender", "age_group", "skin", "glasses", "beard", "emotion"]
    assert all(a.per_region for a in config.attributes)
    assert config.attribute("age_group").values == ("young", "middle", "old")
    assert config.attribute("emotion").values == ("happiness", "neutral", "sadness", "anger", "surprise")
    assert config.ignored == ()


def test_custom_config_whole_image_choices_aliases_and_other_objects():
    xml = """<View>
      <Text name="caption" value="$caption"/>
      <Image name="photo" value="$url"/>
      <RectangleLabels name="boxes" toName="photo">
        <Label value="Person face" alias="Face"/><Label value="Hat"/>
      </RectangleLabels>
      <Choices name="mood" toName="photo">
        <Choice value="Happy" alias="happy"/><Choice value="Sad" alias="sad"/>
      </Choices>
      <Choices name="tags" toName="photo" perRegion="true" choice="multiple">
        <Choice value="a"/><Choice value="b"/><Choice value="c"/>
      </Choices>
      <Choices name="topic" toName="caption"><Choice value="x"/><Choice value="y"/></Choices>
    </View>"""
    config = parse(xml)
    assert (config.image_name, config.image_key) == ("photo", "url")
    assert (config.face_name, config.face_label) == ("boxes", "Face")
    mood, tags = config.attributes
    assert (mood.name, mood.values, mood.per_region) == ("mood", ("happy", "sad"), False)
    assert (tags.per_region, tags.multiple) == (True, True)
    assert any("topic" in reason for reason in config.ignored)


def test_whole_image_attributes_need_no_face_box():
    config = parse('<View><Image name="i" value="$img"/><Choices name="g" toName="i">'
                   '<Choice value="m"/><Choice value="f"/></Choices></View>')
    assert config.face_name is None and config.attributes[0].per_region is False


def test_fingerprint_follows_what_predictions_depend_on_only():
    base = default_config_xml()
    assert parse(base).fingerprint() == parse(base.replace("zoom=\"true\"", "")).fingerprint()
    assert parse(base).fingerprint() != parse(base.replace('"pale"', '"light"')).fingerprint()


@pytest.mark.parametrize("xml, message", [
    ("", "empty"),
    ("<View><Image name='i' value='$i'>", "not valid XML"),
    ("<View><Text name='t' value='$t'/></View>", "no <Image>"),
    ("<View><Image name='i' value='static.jpg'/><RectangleLabels name='f' toName='i'>"
     "<Label value='Face'/></RectangleLabels></View>", "task field"),
    ("<View><Image name='i' value='$i'/><Choices name='g' toName='i' perRegion='true'>"
     "<Choice value='m'/><Choice value='f'/></Choices></View>", "no face"),
    ("<View><Image name='i' value='$i'/><RectangleLabels name='f' toName='i'>"
     "<Label value='Cat'/><Label value='Dog'/></RectangleLabels></View>", '"Face"'),
    ("<View><Image name='i' value='$i'/><Choices name='g' toName='i'><Choice value='m'/>"
     "</Choices></View>", "at least two"),
    ("<View><Image name='i' value='$i'/></View>", "nothing to pre-annotate"),
    ("<View><Image name='i' value='$i'/><Choices name='g' toName='i'><Choice value='a'/>"
     "<Choice value='b'/></Choices><Choices name='g' toName='i'><Choice value='a'/>"
     "<Choice value='b'/></Choices></View>", "unique"),
])
def test_configs_we_cannot_serve_say_why(xml, message):
    with pytest.raises(ConfigError, match=message):
        parse(xml)


def test_every_problem_is_listed_at_once():
    xml = ("<View><Image name='i' value='$i'/><Choices name='a' toName='i'><Choice value='x'/>"
           "</Choices><Choices name='b' toName='i' perRegion='true'><Choice value='x'/>"
           "<Choice value='y'/></Choices></View>")
    with pytest.raises(ConfigError) as info:
        parse(xml)
    assert "'a'" in str(info.value) and "'b'" in str(info.value)
